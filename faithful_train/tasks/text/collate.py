"""Padded batches of the text task: rows of a tokenized split (inputs, answers, spans, variables,
concepts, foils, irrelevant tokens, documents and tool calls), lines of plain text, and answers
padded to a width."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch


def collate(
    data: dict[str, Any],
    index: list[int],
    length: int | None,
    *,
    pad_id: int,
    padding_side: str,
    values: dict[str, list[str]],
    concept_values: dict[str, list[str]],
    min_steps: int = 0,
) -> Batch:
    """The rows ``index`` of a tokenized split as a batch padded (on ``padding_side``, with
    ``pad_id``) to the longest input or ``length``. ``values`` are the codes of each variable (in
    the task's order), ``concept_values`` those of each concept (the train split's). A rationale's
    steps: ``step_spans`` ``(B, S, 2)`` token spans (``-1`` past a row's last step), ``n_steps``
    ``(B,)``, and ``span/step<j>`` for the ``min_steps`` steps every row of the task has."""
    inputs = [data["tokens"][i][: data["prompt_len"][i] + data["answer_len"][i] - 1] for i in index]
    T = max([len(x) for x in inputs] + [length or 0])
    A = max(data["answer_len"][i] for i in index)
    B = len(index)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    answer_ids = torch.zeros(B, A, dtype=torch.long)
    answer_pos = torch.zeros(B, A, dtype=torch.long)
    answer_mask = torch.zeros(B, A, dtype=torch.bool)
    shifts = []
    for b, (i, x) in enumerate(zip(index, inputs)):
        shift = T - len(x) if padding_side == "left" else 0
        shifts.append(shift)
        ids[b, shift : shift + len(x)] = torch.tensor(x)
        mask[b, shift : shift + len(x)] = 1
        p, a = data["prompt_len"][i], data["answer_len"][i]
        answer_ids[b, :a] = torch.tensor(data["tokens"][i][p : p + a])
        answer_pos[b, :a] = shift + p - 1 + torch.arange(a)
        answer_pos[b, a:] = shift + p - 1 + a - 1  # empty slots repeat the last (masked out)
        answer_mask[b, :a] = True
    batch: Batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": answer_ids[:, 0].clone(),
        "answer_ids": answer_ids,
        "answer_pos": answer_pos,
        "answer_mask": answer_mask,
    }
    shift_t = torch.tensor(shifts, dtype=torch.long)

    def token_spans(spans: list) -> Tensor:
        return torch.tensor(spans, dtype=torch.long).view(B, 2) + shift_t[:, None]

    for s, spans in data["spans"].items():
        batch[f"span/{s}"] = token_spans([spans[i] for i in index])
    if data["documents"] is not None:
        for j in range(len(data["documents"][index[0]])):
            batch[f"span/doc{j}"] = token_spans([data["documents"][i][j] for i in index])
        batch["doc_kind"] = torch.tensor([data["doc_kind"][i] for i in index], dtype=torch.long)
    if data.get("steps") is not None:
        steps = [data["steps"][i] for i in index]
        S = max(len(x) for x in steps)
        spans = torch.full((B, S, 2), -1, dtype=torch.long)
        for b, row in enumerate(steps):
            spans[b, : len(row)] = torch.tensor(row, dtype=torch.long) + shift_t[b]
        batch["step_spans"] = spans
        batch["n_steps"] = torch.tensor([len(x) for x in steps], dtype=torch.long)
        for j in range(min_steps):
            batch[f"span/step{j}"] = spans[:, j]
        if data.get("cf_step") is not None:
            batch["cf_step"] = torch.tensor([data["cf_step"][i] for i in index], dtype=torch.long)
    if data["tool"] is not None:
        batch["tool_ids"] = torch.tensor([data["tool"][i][0] for i in index], dtype=torch.long)
        for k, name in ((1, "tool"), (2, "result")):
            batch[f"span/{name}"] = token_spans([data["tool"][i][k] for i in index])
    for v, known in values.items():
        codes = [known.index(data["variables"][v][i]) for i in index] if v in data["variables"] else [0] * B
        batch[f"var/{v}"] = torch.tensor(codes, dtype=torch.long)
    for c, labels in data["concepts"].items():
        found = concept_values.get(c, [])
        codes = [found.index(labels[i]) if labels[i] in found else 0 for i in index]
        batch[f"concept/{c}"] = torch.tensor(codes, dtype=torch.long)
    if data["foil"] is not None:
        batch["foil_ids"] = torch.tensor([data["foil"][i] for i in index], dtype=torch.long)
    if data["irrelevant"] is not None:
        marked = torch.zeros(B, T, dtype=torch.bool)
        for b, i in enumerate(index):
            row = torch.tensor(data["irrelevant"][i], dtype=torch.bool)
            marked[b, shifts[b] : shifts[b] + len(row)] = row
        batch["irrelevant"] = marked
    batch["row"] = torch.tensor(index, dtype=torch.long)
    return batch


def pad_lines(lines: list[list[int]], pad_id: int, padding_side: str) -> Batch:
    """Token ids of plain-text lines as ``input_ids`` and ``attention_mask``, padded on ``padding_side``."""
    T = max(len(x) for x in lines)
    ids = torch.full((len(lines), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lines), T, dtype=torch.long)
    for b, x in enumerate(lines):
        shift = T - len(x) if padding_side == "left" else 0
        ids[b, shift : shift + len(x)] = torch.tensor(x)
        mask[b, shift : shift + len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pad_right(values: Tensor, width: int, fill: int | bool) -> Tensor:
    """``values`` (rows of ids or flags) widened to ``width`` columns with ``fill``."""
    extra = width - values.shape[1]
    if extra <= 0:
        return values
    return torch.cat([values, torch.full((values.shape[0], extra), fill, dtype=values.dtype)], 1)
