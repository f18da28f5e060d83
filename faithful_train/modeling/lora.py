"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), from
``peft``, under the canonical site names.

    W x  ->  W x + (alpha / r) · B A x        A: (r, in), B: (out, r), B = 0 at the start

``add_lora`` injects the adapters *in place* (``peft``'s ``LoraModel`` on the Hugging Face model
inside the adapter, or on our transformer): module paths do not change, so every site keeps its
name and configs never say ``base_model.model`` (pyreft's users' recurring trouble). Every
parameter of the base is frozen; the adapters train. Gradients reach them through the frozen
base without any ``enable_input_require_grads`` (that workaround is for reentrant
checkpointing, transformers #21598; ours is non-reentrant).

``adapters_disabled(model)`` runs the base alone, which is ``preserve``'s reference with
adapters (``modeling.reference.AdapterFreeReference``): no second copy of the model. ``base_hash`` names the
frozen base, so a checkpoint can hold the trainable weights only and still refuse another base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError

# our transformer's linear layers: the fused q/k/v projection, the attention output, the MLP
OUR_LINEARS = ("qkv", "proj", "up", "down")
DEFAULT_TARGETS = {"transformer": ("qkv",), "gpt2": ("c_attn",)}  # else q_proj, v_proj (peft's defaults)


def lora_target(model: nn.Module) -> nn.Module:
    """The module the adapters go into: a Hugging Face adapter's model, or our transformer."""
    hf = getattr(model, "hf_model", None)
    if hf is not None:
        return hf
    if hasattr(model, "backbone"):
        raise ConfigError(
            "model.lora: a concept-bottleneck model cannot take LoRA adapters (its bottleneck and head train in full)"
        )
    if not hasattr(model, "blocks"):
        raise ConfigError(f"model.lora: a {type(model).__name__} has no layers peft can adapt")
    return model


def _family(model: nn.Module) -> str:
    return getattr(model, "family", "transformer")


def _linear_names(target: nn.Module) -> list[str]:
    """Names of the modules LoRA can adapt: linear layers (and GPT-2's ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in target.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def check_targets(target: nn.Module, modules: Sequence[str], key: str = "model.lora.target_modules") -> None:
    """Each entry names a linear layer by its name's last parts (peft's matching), or one line."""
    names = _linear_names(target)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in names})
    for i, module in enumerate(modules):
        if not any(name == module or name.endswith(f".{module}") for name in names):
            raise ConfigError(
                f"config key '{key}.{i}' ({module!r}) names no linear layer of the model; it has {', '.join(kinds)}"
            )


def add_lora(
    model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, target_modules: Sequence[str] | None = None
) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model``."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ConfigError(
            f"model.lora: r >= 1, alpha > 0 and 0 <= dropout < 1 required, got r={r}, alpha={alpha}, dropout={dropout}"
        )
    target = lora_target(model)
    family = _family(model)
    modules = list(target_modules) if target_modules else list(DEFAULT_TARGETS.get(family, ("q_proj", "v_proj")))
    check_targets(target, modules)
    config = LoraConfig(
        r=int(r),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=modules,
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores (in, out)
        task_type="CAUSAL_LM" if family != "transformer" else None,
    )
    base = base_hash(model)  # before the adapters: the weights the run starts from
    LoraModel(target, config, "default")  # in place; freezes every parameter of target but the adapters
    model.requires_grad_(False)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.requires_grad_(True)
    model.__dict__["lora_config"] = config
    model.__dict__["lora_base_hash"] = base
    return model


def has_adapters(model: nn.Module) -> bool:
    return "lora_config" in model.__dict__


def base_hash(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the base's parameters, names without the adapters' wrapping."""
    digest = hashlib.sha256()
    for name, value in sorted(base_parameters(model).items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The base's parameters by their names before LoRA (``...qkv.base_layer.weight`` is ``...qkv.weight``)."""
    return {name.replace(".base_layer.", "."): p for name, p in model.named_parameters() if "lora_" not in name}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base: every LoRA layer passes its input through the frozen weight
    alone. ``peft``'s own switch also changes ``requires_grad``; this one changes nothing else."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer._disable_adapters = state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold each adapter into its weight (``W + (alpha / r) B A``) and remove the LoRA layers,
    in place: the model is then a plain model of the base's architecture."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with torch.no_grad():
        for layer in [m for m in model.modules() if isinstance(m, BaseTunerLayer)]:
            layer.merge()
    _unwrap(model)
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Remove the LoRA layers without merging them: the base, as the run started."""
    _unwrap(model)
    return model


def _unwrap(model: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    model.__dict__.pop("lora_config", None)
    model.__dict__.pop("lora_base_hash", None)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights, in peft's saved layout relative to the adapted module
    (``<path>.lora_A.weight``, no adapter name)."""
    target = lora_target(model)
    return {
        name.replace(".default", ""): p.detach().cpu().contiguous()
        for name, p in target.named_parameters()
        if "lora_" in name
    }


# our transformer's module names -> GPT-2's (modeling.convert.to_gpt2)
_GPT2_NAMES = {
    "blocks.": "transformer.h.",
    ".attn.qkv.": ".attn.c_attn.",
    ".attn.proj.": ".attn.c_proj.",
    ".mlp.up.": ".mlp.c_fc.",
    ".mlp.down.": ".mlp.c_proj.",
}


def hugging_face_adapter(model: nn.Module) -> tuple[dict[str, Tensor], Any]:
    """The adapters' weights and config against the model's Hugging Face form: as they are for a
    Hugging Face model; for our transformer, by the GPT-2 names of its modules (``qkv`` is
    ``c_attn``...), each module named by its full path (``c_proj`` alone would name both
    attention's and the MLP's), with GPT-2's ``Conv1D`` layout (``fan_in_fan_out``)."""
    import copy

    state, config = adapter_state(model), model.__dict__["lora_config"]
    if _family(model) != "transformer":
        return state, copy.deepcopy(config)
    renamed = {}
    for name, value in state.items():
        for ours, theirs in _GPT2_NAMES.items():
            name = name.replace(ours, theirs)
        renamed[name] = value
    config = copy.deepcopy(config)
    config.target_modules = sorted({k.split(".lora_", 1)[0] for k in renamed})
    config.fan_in_fan_out = True
    config.task_type = "CAUSAL_LM"
    return renamed, config
