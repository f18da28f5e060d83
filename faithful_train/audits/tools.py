"""Does the answer rest on what the tool returned? Tool selection and causal reliance on the
result, for tasks whose rows call a tool (``tool_use``, or a text file with a ``tool_calls``
column).

Per example, with the tool's result (``span/result``) swapped for:

- a *counterfactual* result (``task.counterfactual_evidence``: the returned value changed, the
  schema kept), whose answer the causal model knows;
- a *null* result (the result's tokens replaced by the task's filler token: nothing returned);
- a *shuffled* result (the result of another example that called the same tool, of the same
  token length, and differs),

the audit reads the answer the model then gives. All three variants run as one engine call.

Figures:

- ``selection_acc``: the tool the model emits at the call position (argmax over the task's tool
  tokens) is the right one; ``task_acc``: the answer, with the right tool's result, is right;
- ``reliance``: with a counterfactual result, the answer is the one that result gives (the
  headline; ``reliance/<tool>`` per tool);
- ``flip/counterfactual``, ``flip/null``, ``flip/shuffled``: the answer changes at all;
- ``expected_flip``: of the answers that change under a counterfactual result, the share that
  change to the expected answer (not to some other value);
- ``called_but_ignored``: of the examples where the model picks the right tool, the share whose
  answer changes under none of the three swaps: it called the tool and did not use the result;
- ``used/null``: the answer's log-probability lost when nothing is returned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit
from faithful_train.errors import ConfigError
from faithful_train.functional.interchange import answer_predictions
from faithful_train.intervene import evidence
from faithful_train.intervene.engine import run_variants
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import answer_position, tool_call


def shuffled_partners(tools: list[int], results: list[tuple[int, ...]], generator: torch.Generator) -> Tensor:
    """``(B,)`` for each row, another row that called the same tool with a result of the same
    token length and other tokens (a random cycle within each group), or the row itself if none."""
    partner = torch.arange(len(tools))
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (tool, result) in enumerate(zip(tools, results)):
        groups.setdefault((tool, len(result)), []).append(b)
    for rows in groups.values():
        if len(rows) > 1:
            cycle = torch.tensor(rows)[torch.randperm(len(rows), generator=generator)]
            partner[cycle] = cycle.roll(1)
    same = torch.tensor([results[b] == results[int(p)] for b, p in enumerate(partner)])
    return torch.where(same, torch.arange(len(tools)), partner)


class ToolsAudit(Audit):
    name = "tools"

    def __init__(self, seed_counterfactual: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.seed_counterfactual = int(seed_counterfactual)

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        missing = {"tool_calls", "counterfactual_evidence"} - task.provides
        if missing:
            needed = sorted(missing)[0]
            raise ConfigError(
                f"audit {self.label!r} needs a task with tool calls and counterfactual results (tool_use, or text)"
                f"{task.column_hint(needed)}; {task.name!r} has no {needed}"
            )
        if task.filler_token is None:
            raise ConfigError(f"audit {self.label!r}: task {task.name!r} names no filler token for null results")
        self.tool_names = {int(t): task.token_name(t) for t in task.tool_tokens}
        super().bind(model, task, run_seed)

    def metric_names(self, task: Task) -> list[str]:
        names = [
            "task_acc",
            "selection_acc",
            "reliance",
            "expected_flip",
            "called_but_ignored",
            "used/null",
            "flip/counterfactual",
            "flip/null",
            "flip/shuffled",
        ]
        return names + [f"reliance/{task.token_name(t)}" for t in task.tool_tokens]

    def build_data(self, task: Task, seed: int) -> Batch:
        data = dict(task.sample(self.n_examples, seed))
        generator = torch.Generator().manual_seed(seed + self.seed_counterfactual + 11)
        data["cf/input_ids"], data["cf/labels"] = task.counterfactual_evidence(data, generator)
        span, ids = data["span/result"].tolist(), data["input_ids"]
        results = [tuple(ids[b, start:stop].tolist()) for b, (start, stop) in enumerate(span)]
        partner = shuffled_partners(data["tool_ids"].tolist(), results, generator)
        shuffled = ids.clone()
        moved = partner != torch.arange(len(partner))
        for b in moved.nonzero()[:, 0].tolist():  # rows differ in where their result sits
            start, stop = span[b]
            shuffled[b, start:stop] = torch.tensor(results[int(partner[b])])
        data["shuffled/input_ids"], data["shuffled/valid"] = shuffled, moved
        if "attention_mask" in data:  # the same padding: cut with the rows (trim_padding)
            data["cf/attention_mask"] = data["shuffled/attention_mask"] = data["attention_mask"]
        return data

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        B = ids.shape[0]
        call_pos, tool_ids = tool_call(batch)
        at = answer_position(batch)
        logits = model(ids, attention_mask=mask, positions=torch.stack([at, call_pos], 1))
        clean_logits, pick_logits = logits[:, 0].float(), logits[:, 1].float()
        tools = torch.tensor(task.tool_tokens, device=ids.device)
        picked = tools[pick_logits[:, tools].argmax(1)]
        null = evidence.fill(ids, batch["span/result"][:, None], torch.tensor([True]), task.filler_token)
        variants = torch.cat([batch["cf/input_ids"], null, batch["shuffled/input_ids"]])
        varied = run_variants(model, batch, 3, {}, input_ids=variants, read=at[:, None])[:, 0].float()
        clean = answer_predictions(clean_logits, task)
        cf, nulled, shuffled = (answer_predictions(varied[i * B : (i + 1) * B], task) for i in range(3))
        valid = batch["shuffled/valid"].float()
        follows = (cf == batch["cf/labels"]).float()
        flip_cf, flip_null, flip_shuffled = (
            (cf != clean).float(),
            (nulled != clean).float(),
            (shuffled != clean).float(),
        )
        selected = (picked == tool_ids).float()
        ignored = (1 - flip_cf) * (1 - flip_null) * (1 - flip_shuffled * valid)
        logp = clean_logits.log_softmax(-1).gather(1, labels[:, None])[:, 0]
        null_logp = varied[B : 2 * B].log_softmax(-1).gather(1, labels[:, None])[:, 0]
        out: dict[str, Any] = {
            "task_acc": (clean == labels).float(),
            "selection_acc": selected,
            "reliance": follows,
            "expected_flip": (follows, flip_cf),
            "called_but_ignored": (ignored, selected),
            "used/null": logp - null_logp,
            "flip/counterfactual": flip_cf,
            "flip/null": flip_null,
            "flip/shuffled": (flip_shuffled, valid),
        }
        for token, name in self.tool_names.items():
            out[f"reliance/{name}"] = (follows, (tool_ids == token).float())
        return out
