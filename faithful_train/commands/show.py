"""``faithful-train data show -c CONFIG``: a config's first examples as tokens, with the answer,
the named spans and every alignment's positions marked, resolved per example as training and the
audits resolve them. Wrong positions are the field's most common silent mistake; this shows them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from faithful_train.intervene.sites import SiteRef, resolve_positions
from faithful_train.registry import TASKS, instantiate
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import answer_mask, answer_positions, answer_targets
from faithful_train.training.config import to_plain


def alignments(cfg: DictConfig) -> dict[str, SiteRef]:
    """``{"<entry>:<variable>": ref}`` of every alignment and strict site in the config."""
    out = {}
    for kind in ("objectives", "audits"):
        for i, entry in enumerate(cfg[kind]):
            spec = to_plain(entry)
            for var, ref in (spec.get("alignment") or {}).items():
                out[f"{kind}.{i}:{var}"] = SiteRef.parse(ref)
            for j, ref in enumerate(spec.get("strict") or []):
                out[f"{kind}.{i}:strict{j}"] = SiteRef.parse(ref)
    return out


def examples(task: Task, n: int, split: str, seed: int) -> Batch:
    rows = getattr(task, "rows", None)
    if rows is not None:  # a task with files: the split's first rows
        size = len(task.splits[split]["tokens"])
        return rows(split, range(min(n, size)))
    return task.sample(n, seed)


def show_examples(cfg: DictConfig, config_dir: Path | None, n: int = 3, split: str = "train") -> str:
    task = instantiate("task", to_plain(cfg.task), TASKS, Task, config_dir)
    batch = examples(task, n, split, cfg.seed)
    refs = alignments(cfg)
    marks: dict[str, torch.Tensor | None] = {name: resolve_positions(ref, batch) for name, ref in refs.items()}
    positions, targets, valid = answer_positions(batch), answer_targets(batch), answer_mask(batch)
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    lines = []
    for b in range(batch["input_ids"].shape[0]):
        row = int(batch["row"][b]) if "row" in batch else b
        answer = " ".join(task.token_name(int(t)) for t, ok in zip(targets[b], valid[b]) if ok)
        lines.append(f"example {b} ({split} row {row}): answer {answer!r}")
        for t, token in enumerate(batch["input_ids"][b].tolist()):
            tags = []
            if not mask[b, t]:
                tags.append("pad")
            for a, (p, ok) in enumerate(zip(positions[b].tolist(), valid[b].tolist())):
                if ok and p == t:
                    tags.append(f"predicts answer[{a}] {task.token_name(int(targets[b, a]))!r}")
            for key in [k for k in batch if k.startswith("span/")]:
                start, stop = batch[key][b].tolist()
                if start <= t < stop:
                    tags.append(f"span {key.split('/', 1)[1]}")
            for name, where in marks.items():
                if where is None:
                    continue
                if t in where[b].tolist():
                    tags.append(f"{name} @ {refs[name].name}")
            lines.append(f"  {t:>4}  {task.token_name(token):<16} {'; '.join(tags)}")
    return "\n".join(lines)
