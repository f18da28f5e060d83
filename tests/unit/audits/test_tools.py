"""The tools audit, on planted models whose answers are known: a reader that answers
from the tool's result, and an ignorer that computes the answer itself (memory, arithmetic)
while calling the right tool."""

import pytest
import torch
from torch import nn

from faithful_train.audits.tools import ToolsAudit, shuffled_partners
from faithful_train.errors import ConfigError
from faithful_train.tasks.batch import gather_positions
from faithful_train.tasks.kv_retrieval import KVRetrieval
from faithful_train.tasks.tool_use import N_FIELDS, RESULT_START, ToolUse


class Planted(nn.Module):
    def __init__(self, task: ToolUse, reads: bool, picks_lookup_always: bool = False):
        super().__init__()
        self.task, self.reads, self.always = task, reads, picks_lookup_always
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, input_ids, attention_mask=None, positions=None, narrow=True):
        t = self.task
        B, T = input_ids.shape
        asked = input_ids[:, 2]
        is_lookup = asked < t.first_op
        record = input_ids[:, RESULT_START : RESULT_START + 2 * N_FIELDS].view(B, N_FIELDS, 2)
        match = record[..., 0] == asked[:, None]
        if self.reads:
            answer = torch.where(match.any(1), (record[..., 1] * match).sum(1), t.filler_token)
        else:
            x, y = input_ids[:, 1], input_ids[:, 3] - t.first_value
            field = torch.where(is_lookup, asked - t.first_key, asked - t.first_op)
            a = x - t.first_value
            calc = torch.stack([(a + y) % t.n_values, (a - y) % t.n_values, (a * y) % t.n_values], 1).gather(
                1, field[:, None]
            )[:, 0]
            lookup = t.table[x.clamp(0, t.n_entities - 1), field]
            answer = t.first_value + torch.where(is_lookup, lookup, calc)
        tool = t.first_tool + torch.where(is_lookup | self.always, 0, 1)
        logits = torch.zeros(B, T, t.vocab_size)
        logits[:, -1] = self.scale * nn.functional.one_hot(answer, t.vocab_size).float()
        logits[:, 4] = self.scale * nn.functional.one_hot(tool, t.vocab_size).float()
        return logits if positions is None else gather_positions(logits, positions)


def _run(**kwargs):
    task = ToolUse()
    audit = ToolsAudit(n_examples=128, batch_size=64)
    model = Planted(task, **kwargs)
    audit.bind(model, task)
    return audit.evaluate(model, task)


def test_a_reader_relies_on_the_result():
    figures = _run(reads=True)
    assert figures["task_acc"] == 1.0 and figures["selection_acc"] == 1.0
    assert figures["reliance"] == 1.0 and figures["expected_flip"] == 1.0
    assert figures["flip/counterfactual"] == 1.0 and figures["flip/shuffled"] > 0.75 and figures["flip/null"] > 0.85
    assert figures["called_but_ignored"] == 0.0 and figures["used/null"] > 5
    assert figures["reliance/lookup"] == 1.0 and figures["reliance/calc"] == 1.0


def test_an_ignorer_calls_the_tool_and_ignores_it():
    figures = _run(reads=False)
    assert figures["task_acc"] == 1.0 and figures["selection_acc"] == 1.0
    assert figures["reliance"] == 0.0
    assert figures["flip/counterfactual"] == 0.0 and figures["flip/null"] == 0.0 and figures["flip/shuffled"] == 0.0
    assert figures["called_but_ignored"] == 1.0 and figures["used/null"] == pytest.approx(0.0)


def test_selection_is_scored_over_the_tools():
    figures = _run(reads=True, picks_lookup_always=True)
    task = ToolUse()
    lookups = (task.sample(128, 1_000_003)["var/tool"] == 0).float().mean().item()
    assert figures["selection_acc"] == pytest.approx(lookups)


def test_shuffled_partners_share_tool_and_length_and_differ():
    partner = shuffled_partners([0, 0, 1, 1, 0], [(1, 2), (3, 4), (5,), (5,), (7, 8)], torch.Generator().manual_seed(0))
    assert partner[2] == 2 and partner[3] == 3  # the same result: no partner
    assert {int(partner[0]), int(partner[1]), int(partner[4])} <= {0, 1, 4} and all(partner[i] != i for i in (0, 1, 4))


def test_tools_needs_tool_calls():
    from tests.conftest import tiny_transformer

    with pytest.raises(ConfigError, match="tool"):
        ToolsAudit().bind(tiny_transformer(), KVRetrieval())
