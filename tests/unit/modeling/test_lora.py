"""LoRA adapters under the canonical site names: the same sites and (at the start) the same
logits, only the adapters train and their gradients come through the frozen base, the base alone
is preserve's reference (no copy), and an exported adapter loads in peft as the same model."""

from __future__ import annotations

import pytest
import torch

from faithful_train.errors import ConfigError
from faithful_train.intervene import sites
from faithful_train.modeling import starting_point
from faithful_train.modeling.hf import HFAdapter
from faithful_train.modeling.lora import (
    adapters_disabled,
    add_lora,
    base_hash,
    has_adapters,
    hugging_face_adapter,
    merge_adapters,
)
from faithful_train.modeling.reference import AdapterFreeReference
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.preserve import PreserveObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer

VOCAB = 50
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
MODELS = {
    "ours": lambda: tiny_transformer(VOCAB),
    "gpt2": lambda: HFAdapter.from_config("gpt2", GPT2, vocab_size=VOCAB, seed=0),
    "llama": lambda: HFAdapter.from_config("llama", LLAMA, vocab_size=VOCAB, seed=0),
}
TARGETS = {"ours": ["qkv", "down"], "gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(0))


def _moved(model: torch.nn.Module) -> None:
    """Adapters trained a little: B is no longer 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


@pytest.mark.parametrize("kind", list(MODELS))
def test_adapters_keep_the_sites_and_start_as_the_base(kind: str):
    model = MODELS[kind]().eval()
    before_sites, before = set(model.site_points()), model(ids())
    with torch.no_grad(), sites.hooked(model, record=["blocks.1.resid_pre"]) as clean:
        model(ids())
    add_lora(model, r=4, alpha=8, target_modules=TARGETS[kind])
    assert has_adapters(model) and set(model.site_points()) == before_sites  # no base_model.model anywhere
    torch.testing.assert_close(model(ids()), before, atol=0, rtol=0)
    with torch.no_grad(), sites.hooked(model, record=["blocks.1.resid_pre"]) as adapted:
        model(ids())
    torch.testing.assert_close(adapted["blocks.1.resid_pre"], clean["blocks.1.resid_pre"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) < 0.25 * sum(
        p.numel() for p in model.parameters()
    )


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_the_adapters_through_the_frozen_base(kind: str, checkpointing: bool):
    """No ``enable_input_require_grads``: the frozen embeddings need no gradient (transformers #21598
    concerns reentrant checkpointing; ours is non-reentrant), with activation checkpointing too."""
    model = MODELS[kind]()
    add_lora(model, r=4, target_modules=TARGETS[kind])
    _moved(model)
    model.enable_activation_checkpointing(checkpointing)
    model.train()
    model(ids()).logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    first = [n for n in grads if ".0." in n]  # the first layer's adapters, below every other
    assert first and all(float(grads[n].abs().sum()) > 0 for n in first)


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_base_alone_is_preserves_reference(kind: str):
    task = HierarchicalEquality()
    model = MODELS[kind]()
    batch = task.sample(8, 0)
    base = model.eval()(batch["input_ids"]).detach()
    add_lora(model, r=4, target_modules=TARGETS[kind])
    reference = starting_point(model)
    assert isinstance(reference, AdapterFreeReference) and reference.model is model  # no second copy
    objective = PreserveObjective()
    objective.bind(model, task)

    def term() -> torch.Tensor:
        logits, cache = sites.run_with(model, batch["input_ids"], record=objective.sites())
        return objective.term(StepContext(batch, logits, cache, model, task, 0, torch.Generator(), reference=reference))

    assert float(term()) == pytest.approx(0.0, abs=1e-7)  # adapters at zero: the model is its base
    _moved(model)
    model.train()
    value = term()
    assert float(value) > 1e-4
    value.backward()
    assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)
    assert model.training  # the reference ran in eval mode and left the model's mode alone
    with adapters_disabled(model):
        torch.testing.assert_close(model.eval()(batch["input_ids"]), base)


def test_base_hash_names_the_base_not_the_adapters():
    model = MODELS["llama"]()
    start = base_hash(model)
    add_lora(model, r=4)
    assert base_hash(model) == start == model.__dict__["lora_base_hash"]
    _moved(model)
    assert base_hash(model) == start
    other = HFAdapter.from_config("llama", LLAMA, vocab_size=VOCAB, seed=1)
    assert base_hash(other) != start


def test_bad_input_is_one_line():
    with pytest.raises(
        ConfigError,
        match=r"'model.lora.target_modules.1' \('q_prj'\) names no linear layer of the model; it has .*q_proj",
    ):
        add_lora(MODELS["llama"](), target_modules=["v_proj", "q_prj"])
    with pytest.raises(ConfigError, match="r >= 1"):
        add_lora(MODELS["ours"](), r=0)


@pytest.mark.parametrize("kind", ["ours", "llama"])
def test_an_exported_adapter_loads_in_peft_as_the_same_model(kind: str, tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from faithful_train.modeling.interface import hugging_face_form

    model = MODELS[kind]().eval()
    hugging_face_form(model).save_pretrained(tmp_path / "base")  # the base, as a user would have it
    add_lora(model, r=4, target_modules=TARGETS[kind])
    _moved(model)
    expected = model(ids())
    state, config = hugging_face_adapter(model)
    config.save_pretrained(tmp_path / "adapter")
    save_file(
        {f"base_model.model.{k}": v for k, v in state.items()}, tmp_path / "adapter" / "adapter_model.safetensors"
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids=ids()).logits, expected, atol=1e-5, rtol=1e-5)
    merged = hugging_face_form(merge_adapters(model))  # --merge: the adapters folded into the weights
    assert not has_adapters(model)
    torch.testing.assert_close(merged(input_ids=ids()).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_edge_level_forward_sees_the_adapters(kind: str):
    """Edge circuits on a LoRA model: with trained adapters on the attention projections, the
    edge-level forward equals the model's logits, and an edge circuit's loss reaches the adapters."""
    from faithful_train.intervene.edges import graph_forward

    model = MODELS[kind]().eval()
    targets = {"ours": ["qkv", "proj"], "gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "k_proj", "o_proj"]}[kind]
    add_lora(model, r=4, target_modules=targets)
    _moved(model)
    read = torch.full((3, 1), 5)
    logits, _ = graph_forward(model, ids(), None, read)
    torch.testing.assert_close(logits, model(ids(), positions=read), atol=1e-5, rtol=0)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)
