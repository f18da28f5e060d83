"""A Hugging Face model's forward resumed at a decoder layer equals its own full forward.

``HFAdapter.forward_to`` / ``forward_from`` rebuild what each family's model passes its layers
(causal mask over padding, position ids over real tokens, rotary embeddings); the reference is
``transformers``' own forward of the same model, so a mask, a position or a rotary table built
differently shows up here. Rows are padded on the left and on the right.
"""

from __future__ import annotations

import pytest
import torch

from faithful_train.intervene import sites
from faithful_train.intervene.engine import plan_resume, run_variants
from faithful_train.modeling.hf import HFAdapter

VOCAB, D, B, T = 50, 32, 3, 7
_LLAMA = dict(hidden_size=D, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
CONFIGS = {
    "gpt2": dict(n_embd=D, n_layer=3, n_head=4, n_inner=64, n_positions=16, bos_token_id=0, eos_token_id=0),
    "llama": _LLAMA,
    "mixtral": dict(_LLAMA, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        _LLAMA,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[1],
    ),
    "olmoe": dict(_LLAMA, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, eos_token_id=0),
}
FAMILIES = list(CONFIGS)
_models: dict[str, HFAdapter] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(family: str) -> HFAdapter:
    if family not in _models:
        torch.manual_seed(0)
        _models[family] = HFAdapter.from_config(family, CONFIGS[family], vocab_size=VOCAB, seed=0).eval()
    return _models[family]


def padded(side: str) -> dict[str, torch.Tensor]:
    """Rows of 7, 5 and 3 real tokens, padded on ``side``; ``positions`` reads two real tokens per row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([7, 5, 3])
    columns = torch.arange(T)[None]
    mask = (columns < lengths[:, None]) if side == "right" else (columns >= T - lengths[:, None])
    last = (lengths - 1) if side == "right" else torch.full((B,), T - 1)
    positions = torch.stack([last - 1, last], 1)
    return {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask.long(), "positions": positions}


def native(m: HFAdapter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``transformers``' own forward, read at the batch's positions."""
    logits = m(batch["input_ids"], attention_mask=batch["attention_mask"])
    return logits.gather(1, batch["positions"][..., None].expand(-1, -1, logits.shape[-1]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_resumed_forward_equals_the_full_forward(family: str, side: str):
    m, batch = model(family), padded(side)
    with torch.no_grad():
        reference = native(m, batch)
        for layer in range(m.n_layers):
            resid = m.forward_to(layer, batch["input_ids"], batch["attention_mask"])
            for narrow in (True, False):
                resumed = m.forward_from(layer, resid, batch["attention_mask"], batch["positions"], narrow=narrow)
                torch.testing.assert_close(resumed, reference, atol=1e-5, rtol=0)
        narrowed = m(batch["input_ids"], attention_mask=batch["attention_mask"], positions=batch["positions"])
        torch.testing.assert_close(narrowed, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_resumed_forward_has_the_full_forwards_gradients(family: str):
    m, batch = model(family), padded("left")
    weights = torch.randn(B, 2, VOCAB, generator=torch.Generator().manual_seed(2))

    def grads(fn) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        (fn() * weights).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    full = grads(lambda: native(m, batch))
    resumed = grads(
        lambda: m.forward_from(
            1, m.forward_to(1, batch["input_ids"], batch["attention_mask"]), batch["attention_mask"], batch["positions"]
        )
    )
    m.zero_grad(set_to_none=True)
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_a_narrowed_last_layer_records_its_router_at_the_read_positions(family: str):
    m, batch = model(family), padded("right")
    last = m.n_layers - 1
    with torch.no_grad(), sites.hooked(m, record=[f"blocks.{last}.moe.router", f"blocks.{last}.resid_pre"]) as cache:
        m(batch["input_ids"], attention_mask=batch["attention_mask"], positions=batch["positions"])
    assert cache[f"blocks.{last}.moe.router"].shape[:2] == (B, 2)  # two read positions, not T
    assert cache[f"blocks.{last}.resid_pre"].shape[:2] == (B, T)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_engine_resumes_a_hugging_face_model_at_the_edited_layer(family: str):
    """Edited variants resume at the edited layer and equal the same edits on full forwards."""
    m, batch = model(family), padded("left")
    batch = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "answer_pos": batch["positions"],
    }
    plan = plan_resume(m, ["blocks.1.resid_post"])
    assert plan is not None and plan.layer == 2
    source = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))

    def edit(t: torch.Tensor, variants: range) -> torch.Tensor:
        scale = torch.tensor([0.5 * (k + 1) for k in variants]).repeat_interleave(B)[:, None, None]
        return t + scale * source.repeat(len(variants), 1, 1)

    rows: dict[int, list[int]] = {0: [], 2: []}
    points = {i: m.decoder_layers()[i].hook_resid_pre for i in rows}  # called whether or not the layer is narrowed
    counters = [points[i].register_forward_hook(lambda _m, a, _o, i=i: rows[i].append(a[0].shape[0])) for i in rows]
    try:
        with torch.no_grad():
            resumed = run_variants(m, batch, 3, {"blocks.1.resid_post": edit})
            # the clean prefix ran once on the batch's rows; only the layer after the edit ran on 3 variants
            assert rows == {0: [B], 2: [3 * B]}
            full = run_variants(m, batch, 3, {"blocks.1.resid_post": edit}, resume=False)
    finally:
        for counter in counters:
            counter.remove()
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)
