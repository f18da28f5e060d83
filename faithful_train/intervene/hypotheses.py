"""Hypotheses as files: ``<run dir>/hypotheses/<label>.json``, tensors in ``<label>.safetensors``.

A hypothesis is an explanation that can be tested again on any checkpoint or data:

- a *circuit*: nodes (sites narrowed to heads, positions or spans, dims), the granularity of
  the universe they are chosen from, the ablation and the metric; or edges (``a0.h1->m1``,
  ``intervene.graph``), tested by the ``edges`` audit;
- an *alignment*: each high-level variable mapped to a site, through a featurizer (``identity``,
  ``rotation``: a learned orthonormal basis kept in the ``.safetensors`` file, ``random``).

Beside the explanation it records how it was measured (task, hashes of the weights and of the
data, step) and the figures, so ``faithful-train verify`` can print the drift.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.io.files import atomic_write_text
from faithful_train.modeling.sharding import is_distributed_tensor

KINDS = ("circuit", "alignment")
FEATURIZERS = ("identity", "rotation", "random")
FORMAT = 1


@dataclass
class Hypothesis:
    kind: str
    label: str
    nodes: list[Any] = field(default_factory=list)  # circuit: SiteRef dicts
    edges: list[str] = field(default_factory=list)  # edge circuit: "sender->receiver" names
    alignment: dict[str, Any] = field(default_factory=dict)  # alignment: variable -> SiteRef dict
    featurizer: str = "identity"
    granularity: str | None = None
    ablation: str | None = None
    metric: str | None = None
    method: str | None = None  # edge circuit: the attribution method its scores came from
    task: str | None = None
    data_hash: str | None = None
    n_examples: int | None = None  # the audit set: its size and seed, so verify draws the same one
    seed: int | None = None
    weights_hash: str | None = None
    step: int | None = None
    figures: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def circuit(
        cls, label: str, nodes: Any, granularity: str, ablation: str, metric: str, **measured: Any
    ) -> Hypothesis:
        """A circuit (``SiteRef`` nodes) as tested: universe granularity, ablation, metric, and
        whatever was measured (hashes, audit set, step, figures)."""
        return cls(
            kind="circuit",
            label=label,
            nodes=[ref.to_dict() for ref in nodes],
            granularity=granularity,
            ablation=ablation,
            metric=metric,
            **measured,
        )

    def save(self, path: str | Path) -> Path:
        """Write the JSON (and the tensors beside it), each atomically."""
        path = Path(path)
        record = {k: v for k, v in asdict(self).items() if k != "tensors"}
        if self.tensors:
            from safetensors.torch import save

            blob = save({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()})
            tmp = path.with_suffix(".safetensors.tmp")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            tmp.replace(path.with_suffix(".safetensors"))
            record["tensors"] = sorted(self.tensors)
        atomic_write_text(path, json.dumps({"format": FORMAT, **record}, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, kind: str | None = None) -> Hypothesis:
        """Read a hypothesis file; a missing or malformed one is a one-line ``ConfigError``."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"hypothesis {str(path)!r} does not exist (hypotheses live in <run dir>/hypotheses/<label>.json)"
            )
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"hypothesis {path}: not JSON ({e.__class__.__name__} at line {getattr(e, 'lineno', '?')})"
            ) from None
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            raise ConfigError(f"hypothesis {path}: 'kind' must be one of {', '.join(KINDS)}")
        if kind is not None and record["kind"] != kind:
            raise ConfigError(f"hypothesis {path} is an {record['kind']}, not a {kind}")
        names = set(cls.__dataclass_fields__) - {"tensors"}
        unknown = set(record) - names - {"format", "tensors"}
        if unknown:
            raise ConfigError(f"hypothesis {path}: unknown key {sorted(unknown)[0]!r}")
        hypothesis = cls(**{k: v for k, v in record.items() if k in names})
        if record.get("tensors"):
            tensor_path = path.with_suffix(".safetensors")
            if not tensor_path.is_file():
                raise ConfigError(f"hypothesis {path}: its tensors file {tensor_path.name} is missing")
            from safetensors.torch import load_file

            hypothesis.tensors = load_file(str(tensor_path))
        return hypothesis


def weights_hash(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the model's parameters and buffers, in name order. With
    LoRA adapters: of the frozen base's hash (computed once) and the rest, so a large base is
    not hashed again at every checkpoint."""
    digest = hashlib.sha256()
    state = model.state_dict()
    base = model.__dict__.get("lora_base_hash")
    if base is not None:
        digest.update(base.encode())
        frozen = {name for name, p in model.named_parameters() if "lora_" not in name}
        state = {k: v for k, v in state.items() if k not in frozen}
    for name, value in sorted(state.items()):
        if is_distributed_tensor(value):  # a sharded model: every rank gathers, in the same order
            value = value.full_tensor()
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def data_hash(batch: dict[str, Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of the tokens and labels a hypothesis was measured on."""
    digest = hashlib.sha256()
    for key in sorted(k for k in batch if k in ("input_ids", "attention_mask", "labels", "answer_ids")):
        digest.update(key.encode())
        digest.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class HypothesisFiles:
    """Where an audit finds the hypothesis a path names. A relative path is inside the run
    directory; the file of an objective of this run (``hypotheses/<its label>.json``) is taken
    from the objective itself, so an audit during training tests what the objective holds now
    (e.g. a rotation still being learned), as the file it writes would say."""

    def __init__(self, run_dir: str | Path | None = None, writers: dict[str, Any] | None = None):
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.writers = dict(writers or {})  # objective label -> zero-argument callable -> Hypothesis

    def resolve(self, path: str | Path) -> Path:
        path = Path(path)
        return path if path.is_absolute() or self.run_dir is None else self.run_dir / path

    def _writer(self, path: str | Path) -> Any:
        path = self.resolve(path)
        if self.run_dir is not None and path.parent == self.run_dir / "hypotheses" and path.suffix == ".json":
            return self.writers.get(path.stem)
        return None

    def check(self, path: str | Path, owner: str) -> None:
        """A one-line error now (before training) when nothing will be at ``path``."""
        if self._writer(path) is None and not self.resolve(path).is_file():
            writers = ", ".join(f"hypotheses/{label}.json" for label in self.writers) or "none"
            raise ConfigError(
                f"{owner}: hypothesis {str(path)!r} does not exist and no objective of this run writes it "
                f"(they write: {writers})"
            )

    def load(self, path: str | Path, kind: str | None = None) -> Hypothesis:
        writer = self._writer(path)
        if writer is not None:
            return writer()
        return Hypothesis.load(self.resolve(path), kind)
