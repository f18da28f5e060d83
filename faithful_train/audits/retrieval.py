"""What a model consulted against what it used, per document (ContextCite's question, asked
during training and batched).

For each example and document ``j`` of a task with documents (``kv_retrieval``, or a text file
with a ``documents`` column):

- *consulted*: the attention mass from the answer position to the document's tokens, per layer
  and head (``blocks.{i}.attn.pattern``), and averaged over them;
- *used*: ``log p(answer) - log p(answer | document j replaced by filler tokens of the same
  length)``; *used_removed*: the same with the document's tokens deleted (the row left-padded,
  so positions close up);
- *surrogate* (``surrogate_ablations: n``, ContextCite, Cohen-Wang et al. 2024): ``n`` random
  subsets of the documents kept (the rest filled), and per example a linear fit of the answer's
  log-odds on which documents were kept; its weights are each document's effect while the
  others vary too, where documents interact (two that each suffice, one that needs another).

Every document's variants, the counterfactual one (the supporting fact replaced) and the
surrogate's subsets run as variants of one engine call (``engine.run_variants``), chunked to
the memory budget.

Figures: ``reliance_acc`` (the gold document is the one whose removal costs most, strictly),
``consulted_used_spearman`` (per example, over documents), ``consulted_used_top1`` (the most
attended document is the most used one), ``distractor_reliance`` (the share of the positive
reliance that falls on the same-key and near-duplicate distractors), ``counterfactual_follow``
(with the gold value replaced, the answer is the new value), ``removed_filled_top1`` (removing
and filling agree on the most used document), ``surrogate_top1`` (the surrogate's largest
weight is the gold document's), ``surrogate_used_spearman``, ``surrogate_r2`` (the fit's R²,
over examples whose answer moves across the subsets), ``consulted/<kind>``, ``used/<kind>``
and ``used_removed/<kind>`` by document kind, and ``task_acc``. Figures that need a gold
document or a counterfactual leave out rows that have none (a text row without
``gold_document`` or ``counterfactual`` columns).

Each run writes ``<run dir>/provenance/step<N>.jsonl``: per example and document, its kind,
consulted (aggregated and per layer), used, used_removed and the surrogate's weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from faithful_train.audits.base import Audit
from faithful_train.errors import ConfigError
from faithful_train.functional.interchange import answer_predictions
from faithful_train.functional.ranking import spearman
from faithful_train.intervene import evidence
from faithful_train.intervene.engine import run_variants
from faithful_train.intervene.sites import run_with, validate_sites
from faithful_train.io.files import atomic_write_text
from faithful_train.modeling.interface import n_layers
from faithful_train.tasks.base import Batch, Task
from faithful_train.tasks.batch import answer_position

KINDS = ("gold", "same_key", "near_duplicate", "other")


class RetrievalAudit(Audit):
    name = "retrieval"

    def __init__(self, seed_counterfactual: int = 0, surrogate_ablations: int = 32, **kwargs: Any):
        super().__init__(**kwargs)
        if surrogate_ablations < 0:
            raise ConfigError(f"audit {self.label!r}: surrogate_ablations must be >= 0, got {surrogate_ablations}")
        self.seed_counterfactual = int(seed_counterfactual)
        self.surrogate_ablations = int(surrogate_ablations)
        self.layers: list[int] = []
        self._records: list[dict[str, Any]] = []

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        if "documents" not in task.provides:
            raise ConfigError(
                f"audit {self.label!r} needs a task with documents (kv_retrieval, "
                f"or text){task.column_hint('documents')}; {task.name!r} has none"
            )
        layers = n_layers(model)
        if layers is None:
            raise ConfigError(f"audit {self.label!r} needs a model that names its blocks (n_layers)")
        self.layers = list(range(layers))
        validate_sites(model, [f"blocks.{i}.attn.pattern" for i in self.layers])
        self.n_docs = evidence.n_documents(task.spans)
        super().bind(model, task, run_seed)

    def metric_names(self, task: Task) -> list[str]:
        names = [
            "task_acc",
            "reliance_acc",
            "consulted_used_spearman",
            "consulted_used_top1",
            "distractor_reliance",
            "counterfactual_follow",
            "removed_filled_top1",
            "surrogate_top1",
            "surrogate_used_spearman",
            "surrogate_r2",
        ]
        return names + [f"{what}/{kind}" for what in ("consulted", "used", "used_removed") for kind in KINDS]

    def build_data(self, task: Task, seed: int) -> Batch:
        data = dict(task.sample(self.n_examples, seed))
        generator = torch.Generator().manual_seed(seed + self.seed_counterfactual + 5)
        if "counterfactual_evidence" in task.provides:
            data["cf/input_ids"], data["cf/labels"] = task.counterfactual_evidence(data, generator)
            if "attention_mask" in data:  # the same padding: cut with the rows (trim_padding)
                data["cf/attention_mask"] = data["attention_mask"]
        self._kept = evidence.random_subsets(
            self.surrogate_ablations, self.n_docs, torch.Generator().manual_seed(seed + 7)
        )
        return data

    def evaluate(self, model: nn.Module, task: Task, rank: int = 0, world_size: int = 1) -> dict[str, float]:
        self._records = []
        return super().evaluate(model, task, rank, world_size)

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        B, k, n = ids.shape[0], self.n_docs, self.surrogate_ablations
        filler = task.filler_token
        sites = [f"blocks.{i}.attn.pattern" for i in self.layers]
        logits, cache = run_with(model, ids, record=sites, attention_mask=mask)
        at = answer_position(batch)
        spans = evidence.document_spans(batch, k)  # (B, k, 2)
        in_doc = evidence.in_spans(spans, ids.shape[1])  # (B, k, T)
        per_layer = []
        for site in sites:
            rows = cache[site][torch.arange(B), :, at]  # (B, H, T): from the answer position
            per_layer.append(torch.einsum("bht,bkt->bhk", rows.float(), in_doc.float()))
        consulted_lh = torch.stack(per_layer, 1)  # (B, L, H, k)
        consulted = consulted_lh.mean((1, 2))  # (B, k)

        eye = torch.eye(k, dtype=torch.bool, device=ids.device)
        removed = [evidence.remove(ids, mask, spans[:, j], filler) for j in range(k)]
        kept = self._kept.to(ids.device)
        has_cf = "cf/input_ids" in batch
        full_mask = torch.ones_like(ids) if mask is None else mask
        variants = [evidence.fill(ids, spans, eye[j], filler) for j in range(k)]
        variants += [batch["cf/input_ids"]] if has_cf else []
        variants += [r[0] for r in removed] + [evidence.fill(ids, spans, ~kept[i], filler) for i in range(n)]
        masks = [full_mask] * (k + has_cf) + [r[1] for r in removed] + [full_mask] * n
        varied = run_variants(
            model, batch, len(variants), {}, input_ids=torch.cat(variants), attention_mask=torch.cat(masks)
        )[:, 0].float()
        answer_logp = (
            varied.log_softmax(-1).gather(1, labels.repeat(len(variants))[:, None])[:, 0].view(len(variants), B)
        )
        clean = logits[torch.arange(B), at].float().log_softmax(-1).gather(1, labels[:, None])[:, 0]
        used = clean[:, None] - answer_logp[:k].T  # (B, k): log-probability of the answer lost
        used_removed = clean[:, None] - answer_logp[k + has_cf : 2 * k + has_cf].T

        kinds = batch.get("doc_kind", torch.full((B, k), KINDS.index("other"), device=ids.device))
        has_gold = (kinds == 0).any(1)
        gold = (kinds == 0).long().argmax(1)
        others = used.masked_fill((kinds == 0), float("-inf")).max(1).values
        positive = used.clamp_min(0)
        distractor = ((kinds == 1) | (kinds == 2)).float()
        top_used = used.argmax(1)
        unique_top = (used == used.max(1, keepdim=True).values).sum(1) == 1
        with_gold = has_gold.float()
        out: dict[str, Any] = {
            "task_acc": (answer_predictions(logits[torch.arange(B), at], task) == labels).float(),
            "reliance_acc": ((used.gather(1, gold[:, None])[:, 0] > others).float(), with_gold),
            "consulted_used_spearman": spearman(consulted.double(), used.double()).float(),
            "consulted_used_top1": ((consulted.argmax(1) == top_used) & unique_top).float(),
            "distractor_reliance": ((positive * distractor).sum(1) / positive.sum(1).clamp_min(1e-9)).float(),
            "removed_filled_top1": (used_removed.argmax(1) == top_used).float(),
        }
        if has_cf:
            cf_logits = varied[k * B : (k + 1) * B]
            out["counterfactual_follow"] = (answer_predictions(cf_logits, task) == batch["cf/labels"]).float()
        surrogate = torch.full((B, k), float("nan"), device=ids.device)
        if n:
            target = evidence.log_odds(answer_logp[2 * k + has_cf :].T)  # (B, n)
            surrogate, r2 = evidence.linear_surrogate(kept, target)
            out["surrogate_top1"] = ((surrogate.argmax(1) == gold).float(), with_gold)
            out["surrogate_used_spearman"] = spearman(surrogate.double(), used.double()).float()
            out["surrogate_r2"] = (r2.nan_to_num(0.0), (target.var(1) > 1e-6).float())  # R² of an answer that moves
        for code, kind in enumerate(KINDS):
            present = (kinds == code).float()
            weight = present.sum(1)
            out[f"consulted/{kind}"] = ((consulted * present).sum(1) / weight.clamp_min(1), weight)
            out[f"used/{kind}"] = ((used * present).sum(1) / weight.clamp_min(1), weight)
            out[f"used_removed/{kind}"] = ((used_removed * present).sum(1) / weight.clamp_min(1), weight)
        names = dict(enumerate(KINDS))
        for b in range(B):
            example = len(self._records) // k
            for j in range(k):
                self._records.append(
                    {
                        "example": example,
                        "document": j,
                        "kind": names.get(int(kinds[b, j]), "unknown"),
                        "consulted": round(float(consulted[b, j]), 6),
                        "used": round(float(used[b, j]), 6),
                        "used_removed": round(float(used_removed[b, j]), 6),
                        "surrogate": None if not n else round(float(surrogate[b, j]), 6),
                        "consulted_by_layer": [round(float(v), 6) for v in consulted_lh[b, :, :, j].mean(1)],
                    }
                )
        return out

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self._records)
        atomic_write_text(run_dir / "provenance" / f"step{step:06d}.jsonl", text)
