"""Transcoders for every MLP: one per layer, each reading ``blocks.{i}.mlp.in`` (the MLP's input,
after its norm) and writing ``blocks.{i}.mlp.out``, as circuit-tracer's per-layer transcoders
(Dunefsky et al. 2024, "Transcoders find interpretable LLM feature circuits"; Ameisen et al.
2025, "Circuit tracing").

``Transcoders`` holds them as ``layer{i}`` (its own parameter group and sharding unit, like any
objective's module). On disk a set is a folder with one SAELens-layout folder per layer,
``layer{i}/`` (``cfg.json`` + ``sae_weights.safetensors``), whose ``metadata.hook_name`` is the
site read and ``metadata.hook_name_out`` the site written.

``spliced`` replaces MLP outputs by their transcoders' reconstructions inside a forward of the
real model (each transcoder reading the MLP input of that same forward), for CE recovered and
for interventions on one feature.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import DataError
from faithful_train.intervene.engine import VariantEdit
from faithful_train.intervene.sae import SparseAutoencoder, load_saelens, save_saelens

READS, WRITES = "blocks.{i}.mlp.in", "blocks.{i}.mlp.out"
_LAYER = re.compile(r"^blocks\.(\d+)\.mlp\.in$")


class Transcoders(nn.ModuleDict):
    """The transcoders of one ``sae`` objective with ``layers``, keyed ``layer{i}``."""

    def __init__(self, by_layer: Mapping[int, SparseAutoencoder]):
        super().__init__({f"layer{i}": sae for i, sae in sorted(by_layer.items())})

    @property
    def layers(self) -> list[int]:
        return [int(key[5:]) for key in self.keys()]

    def at(self, layer: int) -> SparseAutoencoder:
        return self[f"layer{layer}"]

    def items_by_layer(self) -> list[tuple[int, SparseAutoencoder]]:
        return [(int(key[5:]), sae) for key, sae in self.items()]


def save_transcoders(transcoders: Transcoders, folder: str | Path) -> None:
    """One SAELens folder per layer, ``<folder>/layer{i}/`` (each file written atomically)."""
    import json
    import os

    for layer, sae in transcoders.items_by_layer():
        where = Path(folder) / f"layer{layer}"
        save_saelens(sae, where, READS.format(i=layer))
        cfg = json.loads((where / "cfg.json").read_text())
        cfg["metadata"]["hook_name_out"] = WRITES.format(i=layer)
        tmp = where / f".cfg.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, where / "cfg.json")


def load_transcoders(folder: str | Path, d_model: int | None = None, n_layers: int | None = None) -> Transcoders:
    """A set from ``folder`` (its ``layer{i}/`` SAELens folders, or a single one), checked
    against the model's width and depth; anything else is a one-line ``DataError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"transcoders: {folder} is not a folder")
    single = (folder / "cfg.json").is_file()
    candidates = [folder] if single else sorted(p for p in folder.iterdir() if (p / "cfg.json").is_file())
    if not candidates:
        raise DataError(
            f"transcoders: {folder} holds no transcoder (a cfg.json + sae_weights.safetensors per layer, "
            "in folders layer<i>/)"
        )
    by_layer: dict[int, SparseAutoencoder] = {}
    for path in candidates:
        sae, cfg = load_saelens(path, d_model, where="transcoders")
        hook = str((cfg.get("metadata") or {}).get("hook_name", ""))
        match = _LAYER.match(hook)
        if match is None:
            raise DataError(
                f"transcoders: {path / 'cfg.json'} reads {hook!r}; a transcoder for attribution reads blocks.<i>.mlp.in"
            )
        layer = int(match.group(1))
        if n_layers is not None and layer >= n_layers:
            raise DataError(f"transcoders: {path} is for layer {layer}; the model has {n_layers} layers")
        if d_model is not None and sae.d_out != d_model:
            raise DataError(
                f"transcoders: the transcoder in {path} writes {sae.d_out} dimensions, the model has {d_model}"
            )
        by_layer[layer] = sae
    return Transcoders(by_layer)


def spliced(
    transcoders: Transcoders,
    layers: Sequence[Sequence[int]],
    ablate: Sequence[tuple[int, int, Tensor, float]] | None = None,
) -> dict[str, list[VariantEdit]]:
    """Engine edits for ``len(layers)`` variants: in variant ``v`` the MLPs of ``layers[v]`` are
    replaced by their transcoders' reconstructions of that forward's own MLP input.
    ``ablate[v] = (layer, feature, positions (B, P) or (P,), scale)``: instead, variant ``v``
    keeps the true MLP output and scales one transcoder feature's contribution there:
    ``mlp.out += (scale - 1) * z_f * W_dec[f]`` at those positions (``scale = 0``: zeroed)."""
    edits: dict[str, list[VariantEdit]] = {}
    seen: dict[int, Tensor] = {}
    for layer, sae in transcoders.items_by_layer():
        chosen = [v for v, ls in enumerate(layers) if layer in ls]
        hit = [v for v, spec in enumerate(ablate or ()) if spec is not None and spec[0] == layer]
        if not chosen and not hit:
            continue

        def keep(t: Tensor, variants: range, layer: int = layer) -> Tensor:
            seen[layer] = t
            return t

        def write(
            t: Tensor, variants: range, layer: int = layer, sae: SparseAutoencoder = sae, chosen: list[int] = chosen
        ) -> Tensor:
            x = seen.pop(layer)
            k = len(variants)
            rows = t.view(k, -1, *t.shape[1:])
            xs = x.view(k, -1, *x.shape[1:])
            out = []
            for j, v in enumerate(variants):
                if v in chosen:
                    out.append(sae.decode(sae.encode(xs[j])).to(t.dtype))
                elif ablate and v < len(ablate) and ablate[v] is not None and ablate[v][0] == layer:
                    _, feature, positions, scale = ablate[v]
                    z = sae.encode(xs[j])[..., feature]  # (B, T)
                    at = torch.zeros_like(z, dtype=torch.bool)
                    where = positions if positions.dim() == 2 else positions.expand(z.shape[0], -1)
                    at.scatter_(1, where.to(z.device), True)
                    delta = ((scale - 1.0) * z * at)[..., None] * sae.W_dec[feature]
                    out.append(rows[j] + delta.to(t.dtype))
                else:
                    out.append(rows[j])
            return torch.cat(out)

        edits[READS.format(i=layer)] = [keep]
        edits[WRITES.format(i=layer)] = [write]
    return edits


def transcoder_inputs(by_layer: Mapping[int, Any]) -> list[str]:
    return [READS.format(i=i) for i in by_layer] + [WRITES.format(i=i) for i in by_layer]
