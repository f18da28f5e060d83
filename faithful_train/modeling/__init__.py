"""Models with canonical sites: our transformer (dense or MoE) and Hugging Face adapters."""

from __future__ import annotations

from typing import Any

from torch import nn

from faithful_train.errors import ConfigError
from faithful_train.modeling.transformer import Transformer, TransformerConfig


def build_model(section: Any, vocab_size: int, seq_len: int, seed: int = 0) -> nn.Module:
    """A model from a resolved ``model`` config section, sized for the task when not given."""
    spec = dict(section)
    arch = spec.pop("arch")
    if arch == "transformer":
        spec["vocab_size"] = spec.get("vocab_size") or vocab_size
        spec["max_seq_len"] = spec.get("max_seq_len") or seq_len
        try:
            return Transformer(TransformerConfig(**spec))
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
    from faithful_train.modeling.hf import HFAdapter  # transformers is slow to import

    if spec.get("path"):
        return HFAdapter.from_pretrained(spec["path"])
    return HFAdapter.from_config(spec["family"], dict(spec.get("config") or {}), vocab_size=vocab_size, seed=seed)
