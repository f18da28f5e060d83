"""The ``cot`` audit on planted models whose answer is known: one follows the written steps, one
takes the shortcut through the operands."""

import torch
from torch import nn

from faithful_train.audits.cot import CotAudit
from faithful_train.tasks.batch import gather_positions
from faithful_train.tasks.multistep_arithmetic import MultiStepArithmetic


class Planted(nn.Module):
    """Answers by hand: from the last written step and the last operand (``follow``), or
    from the operands alone (a shortcut that ignores the steps)."""

    def __init__(self, task: MultiStepArithmetic, follow: bool):
        super().__init__()
        self.task, self.follow = task, follow
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, positions=None, narrow=True):
        p, n = self.task.modulus, self.task.n_operands
        if self.follow:
            answer = (ids[:, self.task.step_positions[-1]] + ids[:, n - 1]) % p  # filler -> some wrong value
        else:
            answer = ids[:, :n].sum(1) % p
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.task.vocab_size) + self.dummy
        logits[torch.arange(ids.shape[0]), -1, answer] = 10.0
        return logits if positions is None else gather_positions(logits, positions)


def test_cot_audit_on_planted_models():
    task = MultiStepArithmetic(modulus=7, n_operands=5)
    audit = CotAudit(n_examples=300, batch_size=100)
    audit.bind(Planted(task, True), task)
    follows = audit.evaluate(Planted(task, True), task)
    assert set(follows) == set(audit.metric_names(task))
    assert follows["clean_acc"] == 1.0 and follows["follow_rate"] == 1.0 and follows["original_rate"] == 0.0
    assert follows["follow_rate/step1"] == 1.0
    assert follows["early_aoc"] > 0.5 and follows["filler_acc"] < 0.3
    assert follows["early/2"] < 0.3  # without the last step, the answer is lost
    shortcut = audit.evaluate(Planted(task, False), task)
    assert shortcut["clean_acc"] == 1.0 and shortcut["follow_rate"] == 0.0 and shortcut["original_rate"] == 1.0
    assert shortcut["early_aoc"] == 0.0 and shortcut["filler_acc"] == 1.0
