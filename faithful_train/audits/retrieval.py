"""What a model consulted against what it used, per document (ContextCite's question, asked
during training and batched).

For each example and document ``j`` of a task with documents (``kv_retrieval``):

- *consulted*: the attention mass from the answer position to the document's tokens, per layer
  and head (``blocks.{i}.attn.pattern``), and averaged over them;
- *used*: ``log p(answer) - log p(answer | document j replaced by filler tokens of the same
  length)``; *used_removed*: the same with the document's tokens deleted (the row left-padded,
  so positions close up). Every document's variants, and a counterfactual one (the gold
  document's value replaced), run as variants of one engine call (``engine.run_variants``).

Figures: ``reliance_acc`` (the gold document is the one whose removal costs most, strictly),
``consulted_used_spearman`` (per example, over documents), ``consulted_used_top1`` (the most
attended document is the most used one), ``distractor_reliance`` (the share of the positive
reliance that falls on the same-key and near-duplicate distractors), ``counterfactual_follow``
(with the gold value replaced, the answer is the new value), ``removed_filled_top1`` (removing
and filling agree on the most used document), ``consulted/<kind>``, ``used/<kind>`` and
``used_removed/<kind>`` by document kind, and ``task_acc``.

Each run writes ``<run dir>/provenance/step<N>.jsonl``: per example and document, its kind,
consulted (aggregated and per layer) and used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.audits.base import Audit
from faithful_train.batches import answer_position
from faithful_train.causal import answer_predictions
from faithful_train.engine import run_variants
from faithful_train.errors import ConfigError
from faithful_train.modeling.interface import n_layers
from faithful_train.ranking import spearman
from faithful_train.rundir import atomic_write_text
from faithful_train.sites import run_with, validate_sites
from faithful_train.tasks.base import Batch, Task

KINDS = ("gold", "same_key", "near_duplicate", "other")


class RetrievalAudit(Audit):
    name = "retrieval"

    def __init__(self, seed_counterfactual: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.seed_counterfactual = int(seed_counterfactual)
        self.layers: list[int] = []
        self._records: list[dict[str, Any]] = []

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if "documents" not in task.provides:
            raise ConfigError(f"audit {self.label!r} needs a task with documents (e.g. kv_retrieval); {task.name!r} has none")
        layers = n_layers(model)
        if layers is None:
            raise ConfigError(f"audit {self.label!r} needs a model that names its blocks (n_layers)")
        self.layers = list(range(layers))
        validate_sites(model, [f"blocks.{i}.attn.pattern" for i in self.layers])
        self.n_docs = sum(1 for s in task.spans if s.startswith("doc"))
        super().bind(model, task, run_seed)

    def metric_names(self, task: Task) -> list[str]:
        names = ["task_acc", "reliance_acc", "consulted_used_spearman", "consulted_used_top1", "distractor_reliance",
                 "counterfactual_follow", "removed_filled_top1"]  # fmt: skip
        return names + [f"{what}/{kind}" for what in ("consulted", "used", "used_removed") for kind in KINDS]

    def build_data(self, task: Task, seed: int) -> Batch:
        data = dict(task.sample(self.n_examples, seed))
        generator = torch.Generator().manual_seed(seed + self.seed_counterfactual + 5)
        data["cf/input_ids"], data["cf/labels"] = task.counterfactual_documents(data, generator)
        return data

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        self._records = []
        return super().evaluate(model, task, rank, world_size)

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        B, k = ids.shape[0], self.n_docs
        sites = [f"blocks.{i}.attn.pattern" for i in self.layers]
        logits, cache = run_with(model, ids, record=sites, attention_mask=mask)
        at = answer_position(batch)
        spans = torch.stack([batch[f"span/doc{j}"] for j in range(k)], 1)  # (B, k, 2)
        positions = torch.arange(ids.shape[1], device=ids.device)
        in_doc = (positions[None, None] >= spans[..., :1]) & (positions[None, None] < spans[..., 1:])  # (B, k, T)
        per_layer = []
        for site in sites:
            rows = cache[site][torch.arange(B), :, at]  # (B, H, T): from the answer position
            per_layer.append(torch.einsum("bht,bkt->bhk", rows.float(), in_doc.float()))
        consulted_lh = torch.stack(per_layer, 1)  # (B, L, H, k)
        consulted = consulted_lh.mean((1, 2))  # (B, k)

        removed = [task.removed(batch, j) for j in range(k)]
        full_mask = torch.ones_like(ids) if mask is None else mask
        variants = torch.cat([task.filled(batch, j) for j in range(k)] + [batch["cf/input_ids"]] + [r[0] for r in removed])
        masks = torch.cat([full_mask] * (k + 1) + [r[1] for r in removed])
        varied = run_variants(model, batch, 2 * k + 1, {}, input_ids=variants, attention_mask=masks)[:, 0].float()
        clean = logits[torch.arange(B), at].float().log_softmax(-1).gather(1, labels[:, None])[:, 0]

        def lost(rows: Tensor) -> Tensor:  # (k B, vocab) -> (B, k): log-probability of the answer lost
            kept = rows.log_softmax(-1).view(k, B, -1).gather(2, labels[None, :, None].expand(k, B, 1))[..., 0].T
            return clean[:, None] - kept

        used, used_removed = lost(varied[: k * B]), lost(varied[(k + 1) * B :])  # (B, k) each
        gold = batch["var/doc"]
        kinds = batch["doc_kind"]
        others = used.masked_fill(torch.nn.functional.one_hot(gold, k).bool(), float("-inf")).max(1).values
        positive = used.clamp_min(0)
        distractor = ((kinds == 1) | (kinds == 2)).float()
        cf_answer = answer_predictions(varied[k * B : (k + 1) * B], task)
        top_used = used.argmax(1)
        unique_top = (used == used.max(1, keepdim=True).values).sum(1) == 1
        out: dict[str, Any] = {
            "task_acc": (answer_predictions(logits[torch.arange(B), at], task) == labels).float(),
            "reliance_acc": (used.gather(1, gold[:, None])[:, 0] > others).float(),
            "consulted_used_spearman": spearman(consulted.double(), used.double()).float(),
            "consulted_used_top1": ((consulted.argmax(1) == top_used) & unique_top).float(),
            "distractor_reliance": ((positive * distractor).sum(1) / positive.sum(1).clamp_min(1e-9)).float(),
            "counterfactual_follow": (cf_answer == batch["cf/labels"]).float(),
            "removed_filled_top1": (used_removed.argmax(1) == top_used).float(),
        }
        for code, kind in enumerate(KINDS):
            present = (kinds == code).float()
            weight = present.sum(1)
            out[f"consulted/{kind}"] = ((consulted * present).sum(1) / weight.clamp_min(1), weight)
            out[f"used/{kind}"] = ((used * present).sum(1) / weight.clamp_min(1), weight)
            out[f"used_removed/{kind}"] = ((used_removed * present).sum(1) / weight.clamp_min(1), weight)
        for b in range(B):
            for j in range(k):
                self._records.append({
                    "example": len(self._records) // k, "document": j, "kind": KINDS[int(kinds[b, j])],
                    "consulted": round(float(consulted[b, j]), 6), "used": round(float(used[b, j]), 6),
                    "used_removed": round(float(used_removed[b, j]), 6),
                    "consulted_by_layer": [round(float(v), 6) for v in consulted_lh[b, :, :, j].mean(1)],
                })  # fmt: skip
        return out

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self._records)
        atomic_write_text(run_dir / "provenance" / f"step{step:06d}.jsonl", text)
