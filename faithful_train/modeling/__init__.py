"""Models with canonical sites: our transformer (dense or MoE) and Hugging Face adapters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.modeling.reference import starting_point  # noqa: F401  (re-exported)
from faithful_train.modeling.transformer import Transformer, TransformerConfig


def build_model(
    section: Any, vocab_size: int, seq_len: int, seed: int = 0, concepts: Mapping[str, Sequence[str]] | None = None
) -> nn.Module:
    """A model from a resolved ``model`` config section, sized for the task when not given;
    with a ``bottleneck`` key, wrapped in a concept bottleneck over the task's ``concepts``."""
    spec = dict(section)
    bottleneck = spec.pop("bottleneck", None)
    lora = spec.pop("lora", None)
    checkpointing = spec.pop("activation_checkpointing", False)
    backbone = _build_backbone(spec, vocab_size, seq_len, seed)
    if lora is not None:
        from faithful_train.modeling.lora import add_lora

        if bottleneck is not None:
            raise ConfigError(
                "model.lora: a concept-bottleneck model cannot take LoRA adapters "
                "(its bottleneck and head train in full)"
            )
        add_lora(backbone, **dict(lora))
    if checkpointing:
        backbone.enable_activation_checkpointing()
    if bottleneck is None:
        return backbone
    return _with_bottleneck(backbone, dict(bottleneck), vocab_size, seed, concepts or {})


def _with_bottleneck(
    backbone: nn.Module, spec: dict[str, Any], vocab_size: int, seed: int, concepts: Mapping
) -> nn.Module:
    from faithful_train.modeling.bottleneck import BottleneckModel
    from faithful_train.modeling.concept_layout import ConceptLayout

    if not concepts:
        raise ConfigError("model.bottleneck needs a task that labels concepts (this one labels none)")
    names = spec.pop("concepts", None)
    for name in names or ():
        if name not in concepts:
            raise UnknownNameError("concept for model.bottleneck", name, concepts)
    layout = ConceptLayout.from_task(concepts, names)
    vocab = getattr(getattr(backbone, "cfg", None), "vocab_size", None) or backbone.hf_model.config.vocab_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        try:
            return BottleneckModel(backbone, layout, max(vocab, vocab_size), **spec)
        except ValueError as e:
            raise ConfigError(f"model.bottleneck: {e}") from None


def _build_backbone(spec: dict[str, Any], vocab_size: int, seq_len: int, seed: int) -> nn.Module:
    arch = spec.pop("arch")
    if arch == "transformer":
        spec["vocab_size"] = spec.get("vocab_size") or vocab_size
        spec["max_seq_len"] = spec.get("max_seq_len") or seq_len
        try:
            return Transformer(TransformerConfig(**spec))
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None
    from faithful_train.modeling.hf import HFAdapter  # transformers is slow to import

    if spec.get("path"):
        return HFAdapter.from_pretrained(spec["path"])
    return HFAdapter.from_config(spec["family"], dict(spec.get("config") or {}), vocab_size=vocab_size, seed=seed)


def model_context(model: nn.Module) -> int | None:
    """The longest input a model takes (its position table), or ``None`` if it has no limit."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "max_seq_len"):
        return cfg.max_seq_len
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        return model_context(backbone)
    hf = getattr(model, "hf_model", None)
    if hf is not None:
        return getattr(hf.config, "n_positions", None) or getattr(hf.config, "max_position_embeddings", None)
    return None


def freeze(model: nn.Module, patterns: Sequence[str], key: str = "optim.freeze") -> list[str]:
    """Stop the parameters whose names match any of ``patterns`` (``fnmatch``: ``tok_emb.*``,
    ``blocks.0.*``) from training, as when fine-tuning with fixed embeddings; returns their names.
    A pattern that names no parameter is a config error (one line, with names that exist)."""
    from fnmatch import fnmatchcase

    names = [name for name, _ in model.named_parameters()]
    for i, pattern in enumerate(patterns):
        if not any(fnmatchcase(name, pattern) for name in names):
            raise ConfigError(
                f"config key '{key}.{i}' ({pattern!r}) names no parameter of the model; "
                f"it has {', '.join(names[:6])}, ..."
            )
    frozen = []
    for name, parameter in model.named_parameters():
        if any(fnmatchcase(name, pattern) for pattern in patterns):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen
