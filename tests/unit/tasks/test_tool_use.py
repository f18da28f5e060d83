"""The tool_use task (``faithful_train/tasks/tool_use.py``): tool calls, results, counterfactual
results and the memorisable table."""

import torch

from faithful_train.tasks.batch import tool_call
from faithful_train.tasks.tool_use import RESULT_START, ToolUse


def test_tool_use_batches_and_counterfactuals():
    task = ToolUse()
    batch = task.sample(64, 0)
    ids = batch["input_ids"]
    assert ids.shape == (64, task.seq_len)
    positions, tools = tool_call(batch)
    assert (ids[torch.arange(64), positions + 1] == tools).all()
    assert (
        ids.gather(1, batch["value_pos"][:, None])[:, 0] == batch["labels"]
    ).all()  # the asked value is in the result
    assert set(batch["var/tool"].tolist()) == {0, 1}
    cf, answers = task.counterfactual_evidence(batch, torch.Generator().manual_seed(0))
    changed = (cf != ids).nonzero()
    assert (changed[:, 1] == batch["value_pos"][changed[:, 0]]).all() and len(changed) == 64  # one token per row
    assert (answers != batch["labels"]).all()
    parametric = batch["input_ids"][batch["var/tool"] == 0]
    again = task.sample(64, 1)["input_ids"]
    # the same entity states the same record in every example (the memorisable table)
    table = {}
    for row in torch.cat([parametric, again[again[:, 5] == task.first_tool]]):
        for f, v in row[RESULT_START : RESULT_START + 6].view(3, 2).tolist():
            assert table.setdefault((int(row[1]), f), v) == v
