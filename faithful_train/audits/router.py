"""Router and expert audit for mixture-of-experts models (ours and Hugging Face ones).

Figures, over the MoE layers audited (``/layer<i>`` per layer; headline = mean over layers):

- ``entropy``: mean routing entropy per token (nats; ``log E`` is uniform routing).
- ``load_cv``, ``load_max_mean``: coefficient of variation and max / mean of the experts'
  top-k assignment counts over the audit set; ``dead_experts``: experts that received no
  token (summed over layers).
- ``expert_concept_nmi``: normalised mutual information between each token's top-1 expert and
  its concept label (``concept``, default the task's only one; arithmetic normalisation).
- ``task_acc``, ``task_acc/<value>``: answer accuracy, overall and per concept value.
- ``ablation/layer<i>/expert<e>[/<value>]``: accuracy lost when expert ``e`` of layer ``i`` is
  masked at the router (its logit set to ``-inf`` before top-k, so the next expert takes its
  place; this works whatever the expert implementation, fused ones included), overall and
  per concept value. All ``L x E`` ablations run in one batched forward.
  ``ablation/own_drop``: for each concept value, the loss when ablating the expert it routes
  to most (top-1, per layer), on that value; ``ablation/other_drop``: the same ablations on
  the other values. A readable, causal routing has own >> other.
- ``routing_stability`` (top-1 expert unchanged) and ``routing_stability_topk`` (share of the
  top-k set kept), per token, under the task's meaning-preserving perturbations.

Each run also writes the per-token expert choices of the first ``n_show`` audit examples to
``<run dir>/router/choices_step<step>.jsonl`` (and a wandb table when wandb logs the run).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faithful_train.audits.base import Audit, Total
from faithful_train.errors import ConfigError
from faithful_train.functional.interchange import answer_predictions
from faithful_train.functional.losses import answer_forward
from faithful_train.functional.routing import entropy_of, load_statistics, normalized_mutual_information, top_k_experts
from faithful_train.intervene.engine import VariantEdit, run_variants
from faithful_train.intervene.sites import hooked, run_with
from faithful_train.io.files import atomic_write_text
from faithful_train.modeling.interface import router_layers
from faithful_train.tasks.base import Batch, Task, take
from faithful_train.tasks.batch import answer_positions, first_answer_logits, gather_positions

PERTURBED = "router.perturbed"


class RouterAudit(Audit):
    name = "router"

    def __init__(
        self,
        concept: str | None = None,
        layers: Sequence[int] | None = None,
        ablation: bool = True,
        stability: bool = True,
        n_show: int = 8,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.concept, self.ablation, self.stability, self.n_show = concept, ablation, stability, n_show
        self.requested_layers = None if layers is None else [int(i) for i in layers]
        self.layers: dict[int, tuple[int, int]] = {}
        self.values: tuple[str, ...] = ("all",)

    def bind(self, model: nn.Module, task: Task, run_seed: int = 0) -> None:
        self.layers = router_layers(model, self.requested_layers, f"audit {self.label!r}")
        if self.concept is not None or task.concepts:
            self.concept = task.check_concept(self.concept, f"audit {self.label!r}")
            self.values = task.concepts[self.concept]
        if self.stability and "perturbations" not in task.provides:
            raise ConfigError(
                f"audit {self.label!r}: task {task.name!r} has no position-aligned perturbations; set stability: false"
            )
        super().bind(model, task, run_seed)

    def metric_names(self, task: Task) -> list[str]:
        per_layer = ["entropy", "load_cv", "load_max_mean", "dead_experts"]
        if self.concept is not None:
            per_layer.append("expert_concept_nmi")
        if self.stability:
            per_layer += ["routing_stability", "routing_stability_topk"]
        names = [*per_layer, *(f"{m}/layer{i}" for m in per_layer for i in self.layers), "task_acc"]
        if self.concept is not None:
            names += [f"task_acc/{v}" for v in self.values]
        if self.ablation:
            for i, (E, _) in self.layers.items():
                for e in range(E):
                    names.append(f"ablation/layer{i}/expert{e}")
                    if self.concept is not None:
                        names += [f"ablation/layer{i}/expert{e}/{v}" for v in self.values]
            if self.concept is not None:
                names += ["ablation/own_drop", "ablation/other_drop"]
        return names

    def build_data(self, task: Task, seed: int) -> Batch:
        batch = task.sample(self.n_examples, seed)
        if self.stability:
            batch[PERTURBED] = task.perturb(batch, torch.Generator().manual_seed(seed + 1))
        return batch

    def _concept_of(self, batch: Batch, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Per-token ``(B, T)`` and per-example ``(B,)`` concept values (0 without a concept;
        a per-token label's example value is its answer position's)."""
        if self.concept is None:
            return torch.zeros(shape, dtype=torch.long, device=batch["labels"].device), torch.zeros_like(
                batch["labels"]
            )
        concept = batch[f"concept/{self.concept}"]
        if concept.dim() == 1:
            return concept[:, None].expand(shape), concept
        return concept, gather_positions(concept, answer_positions(batch))[:, 0]

    def _sites(self) -> list[str]:
        return [f"blocks.{i}.moe.router" for i in self.layers]

    def measure(self, model: nn.Module, task: Task, batch: Batch) -> dict[str, Any]:
        ids, labels = batch["input_ids"], batch["labels"]
        B, C = ids.shape[0], len(self.values)
        doubled = {k: torch.cat([v, v]) for k, v in batch.items() if k in ("attention_mask", "answer_pos")}
        inputs = torch.cat([ids, batch[PERTURBED]]) if self.stability else ids
        with hooked(model, record=self._sites()) as cache:
            rows = doubled | {"input_ids": inputs} if self.stability else batch
            logits = answer_forward(model, rows, inputs, narrow=False)  # every layer's routing is read
        correct = (answer_predictions(first_answer_logits(logits[:B]), task) == labels).float()
        token_concept, example_concept = self._concept_of(batch, ids.shape)
        by_concept = F.one_hot(example_concept, C).float()  # (B, C)
        out: dict[str, Any] = {
            "task_acc": correct,
            "clean_correct": Total(correct @ by_concept),
            "count": Total(by_concept.sum(0)),
        }
        entropies, contingencies, loads = [], [], []
        stable, stable_k = [], []
        real = batch.get("attention_mask", torch.ones_like(ids)).float()  # padding is not routed for real
        n_real = real.sum(1).clamp_min(1)
        for i, (E, k) in self.layers.items():
            router = cache[f"blocks.{i}.moe.router"].float()
            chosen = top_k_experts(router, k, model.selection_bias(i))  # (2B or B, T, k)
            entropy = (entropy_of(router[:B].softmax(-1)) * real).sum(1) / n_real
            out[f"entropy/layer{i}"] = entropy
            entropies.append(entropy)
            top1 = chosen[:B, :, 0]
            pair = token_concept.reshape(-1) * E + top1.reshape(-1)
            contingencies.append(torch.bincount(pair, weights=real.reshape(-1), minlength=C * E).view(C, E))
            loads.append(
                torch.bincount(
                    chosen[:B].reshape(-1), weights=real[:, :, None].expand_as(chosen[:B]).reshape(-1), minlength=E
                )
            )
            if self.stability:
                same = ((chosen[B:, :, 0] == top1).float() * real).sum(1) / n_real
                kept = ((chosen[:B, :, :, None] == chosen[B:, :, None, :]).any(-1).float().mean(2) * real).sum(
                    1
                ) / n_real
                out[f"routing_stability/layer{i}"], out[f"routing_stability_topk/layer{i}"] = same, kept
                stable.append(same)
                stable_k.append(kept)
        out["entropy"] = torch.stack(entropies).mean(0)
        out["contingency"] = Total(torch.stack(contingencies))
        out["load"] = Total(torch.stack(loads))
        if self.stability:
            out["routing_stability"] = torch.stack(stable).mean(0)
            out["routing_stability_topk"] = torch.stack(stable_k).mean(0)
        if self.ablation:
            out["ablated_correct"] = Total(self._ablate(model, task, batch) @ by_concept)
        return out

    def _ablate(self, model: nn.Module, task: Task, batch: Batch) -> Tensor:
        """``(L, E_max, B)`` correctness with each expert of each layer masked at the router,
        all in one forward over ``L * E`` copies of the batch."""
        ids, labels = batch["input_ids"], batch["labels"]
        B = ids.shape[0]
        blocks = [(i, e) for i, (E, _) in self.layers.items() for e in range(E)]
        edits = {f"blocks.{i}.moe.router": _expert_masked(i, E, blocks, B) for i, (E, _) in self.layers.items()}
        logits = first_answer_logits(run_variants(model, batch, len(blocks), edits))
        correct = (answer_predictions(logits, task).view(len(blocks), B) == labels).float()
        E_max = max(E for E, _ in self.layers.values())
        table = torch.zeros(len(self.layers), E_max, B, device=ids.device)
        index = {layer: n for n, layer in enumerate(self.layers)}
        for r, (layer, e) in enumerate(blocks):
            table[index[layer], e] = correct[r]
        return table

    def summarise(self, totals: dict[str, Tensor], task: Task) -> dict[str, float]:
        figures: dict[str, float] = {}
        layer_stats: dict[str, list[float]] = {}
        for n, i in enumerate(self.layers):
            stats = load_statistics(totals["load"][n])
            if self.concept is not None:
                stats["expert_concept_nmi"] = normalized_mutual_information(totals["contingency"][n])
            for name, value in stats.items():
                figures[f"{name}/layer{i}"] = float(value)
                layer_stats.setdefault(name, []).append(float(value))
        for name, values in layer_stats.items():
            figures[name] = sum(values) if name == "dead_experts" else sum(values) / len(values)
        count, clean = totals["count"], totals["clean_correct"]
        clean_acc = clean / count.clamp_min(1)
        if self.concept is not None:
            figures |= {f"task_acc/{v}": float(a) for v, a in zip(self.values, clean_acc)}
        if self.ablation:
            figures |= self._ablation_figures(totals, clean_acc)
        return figures

    def _ablation_figures(self, totals: dict[str, Tensor], clean_acc: Tensor) -> dict[str, float]:
        count, ablated = totals["count"], totals["ablated_correct"]  # (C,), (L, E_max, C)
        drop = clean_acc - ablated / count.clamp_min(1)  # (L, E_max, C)
        overall = (totals["clean_correct"].sum() - ablated.sum(-1)) / count.sum().clamp_min(1)  # (L, E_max)
        figures: dict[str, float] = {}
        own, other = [], []
        for n, (i, (E, _)) in enumerate(self.layers.items()):
            for e in range(E):
                figures[f"ablation/layer{i}/expert{e}"] = float(overall[n, e])
                if self.concept is not None:
                    figures |= {f"ablation/layer{i}/expert{e}/{v}": float(d) for v, d in zip(self.values, drop[n, e])}
            for c in range(len(self.values)):
                if count[c] == 0:
                    continue
                expert = int(totals["contingency"][n, c].argmax())
                own.append(float(drop[n, expert, c]))
                other += [float(drop[n, expert, c2]) for c2 in range(len(self.values)) if c2 != c and count[c2] > 0]
        if self.concept is not None and own:
            figures["ablation/own_drop"] = sum(own) / len(own)
            figures["ablation/other_drop"] = sum(other) / len(other) if other else 0.0
        return figures

    def token_choices(self, model: nn.Module, task: Task) -> list[dict[str, Any]]:
        """Per token of the first ``n_show`` audit examples: its concept and, per layer, the
        experts chosen (top-k, best first) with their routing probabilities."""
        data = take(self.data(task), slice(0, self.n_show))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                mask = data.get("attention_mask")
                _, cache = run_with(
                    model,
                    data["input_ids"].to(device),
                    record=self._sites(),
                    attention_mask=None if mask is None else mask.to(device),
                )
        finally:
            model.train(was_training)
        token_concept, _ = self._concept_of(data, data["input_ids"].shape)
        routes = {}
        for i, (_, k) in self.layers.items():
            router = cache[f"blocks.{i}.moe.router"].float().cpu()
            chosen = top_k_experts(router, k, model.selection_bias(i).cpu())
            routes[i] = (chosen, router.softmax(-1).gather(-1, chosen))
        rows = []
        real = data.get("attention_mask", torch.ones_like(data["input_ids"])).tolist()
        for j, tokens in enumerate(data["input_ids"].tolist()):
            for t, token in enumerate(tokens):
                if not real[j][t]:
                    continue
                rows.append(
                    {
                        "example": j,
                        "position": t,
                        "token": task.token_name(token),
                        "concept": self.values[int(token_concept[j, t])] if self.concept is not None else None,
                        "layers": {
                            str(i): {"experts": c[j, t].tolist(), "probs": [round(p, 4) for p in w[j, t].tolist()]}
                            for i, (c, w) in routes.items()
                        },
                    }
                )
        return rows

    def write_artifacts(self, model: nn.Module, task: Task, run_dir: Path, step: int, loggers: list[Any]) -> None:
        if self.n_show <= 0:
            return
        rows = self.token_choices(model, task)
        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write_text(run_dir / self.label / f"choices_step{step:06d}.jsonl", text)
        columns = ["example", "position", "token", "concept", "layer", "experts", "probs"]
        table = [
            [r["example"], r["position"], r["token"], r["concept"], int(i), str(layer["experts"]), str(layer["probs"])]
            for r in rows
            for i, layer in r["layers"].items()
        ]
        for logger in loggers:
            if hasattr(logger, "log_table"):  # WandbLogger
                logger.log_table(key=f"audit/{self.label}/choices", columns=columns, data=table, step=step)


def _expert_masked(layer: int, n_experts: int, blocks: list[tuple[int, int]], rows: int) -> VariantEdit:
    """Router logits of MoE layer ``layer`` with, in variant ``k``, expert ``blocks[k][1]`` masked
    (its logit ``-inf``) where ``blocks[k][0]`` is this layer."""

    def apply(logits: Tensor, variants: range) -> Tensor:
        mask = torch.zeros(len(variants), 1, 1, n_experts, dtype=torch.bool, device=logits.device)
        for r, k in enumerate(variants):
            mask[r, 0, 0, blocks[k][1]] = blocks[k][0] == layer
        return logits.masked_fill(
            mask.expand(-1, rows, -1, -1).reshape(len(variants) * rows, 1, n_experts), float("-inf")
        )

    return apply
