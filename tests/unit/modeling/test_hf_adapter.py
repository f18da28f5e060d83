"""HFAdapter: canonical sites on tiny random Hugging Face models.

Patching through ``sites.hooked`` is checked against the same edit done by hand, with plain
PyTorch hooks on the HF submodules, so the adapter's read/write functions are tested against
an independent implementation rather than against themselves.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.intervene import interventions, sites
from faithful_train.intervene.sites import SiteRef
from faithful_train.modeling.hf import SUPPORTED_FAMILIES, HFAdapter
from tests.unit.hf_configs import CONFIGS, EXPERTS, HEADS, TOP_K, VOCAB, D

B, T = 2, 5
DH = D // HEADS
MOE_LAYERS = {"mixtral": (0, 1), "qwen2_moe": (0,), "olmoe": (0, 1)}
FAMILIES = list(CONFIGS)

_models: dict[str, HFAdapter] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run thousands of small ops; intra-op threads only add spin-waiting
    (10x slower on a busy 2-core machine). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(family: str) -> HFAdapter:
    """One tiny eval-mode model per family, built once (tests must not change its weights)."""
    if family not in _models:
        torch.manual_seed(0)
        _models[family] = HFAdapter.from_config(family, CONFIGS[family], vocab_size=VOCAB).eval()
    return _models[family]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(VOCAB, (B, T), generator=gen), torch.randint(VOCAB, (B, T), generator=gen)


def expected_shapes(family: str) -> dict[str, tuple[int, ...]]:
    shapes = {"embed": (B, T, D), "final": (B, T, D)}
    for i in range(2):
        shapes |= {f"blocks.{i}.{s}": (B, T, D) for s in ("resid_pre", "resid_post", "attn.out", "mlp.in", "mlp.out")}
        shapes[f"blocks.{i}.attn.heads"] = (B, T, HEADS, DH)
        shapes[f"blocks.{i}.attn.pattern"] = (B, HEADS, T, T)
    for i in MOE_LAYERS.get(family, ()):
        shapes |= {f"blocks.{i}.moe.router": (B, T, EXPERTS), f"blocks.{i}.moe.weights": (B, T, EXPERTS)}
    return shapes


def test_supported_families():
    assert set(SUPPORTED_FAMILIES) == set(FAMILIES)
    with pytest.raises(UnknownNameError, match="gpt2"):
        HFAdapter.from_config("bert", {})


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_shapes_and_gradients(family):
    m = model(family)
    base, _ = inputs()
    assert m.n_layers == 2 and m.family == family
    assert set(m.site_points()) == set(expected_shapes(family))

    logits, cache = sites.run_with(m, base, record=list(expected_shapes(family)))
    assert logits.shape == (B, T, VOCAB)
    for name, shape in expected_shapes(family).items():
        assert cache[name].shape == shape, name
    assert torch.equal(cache["embed"], cache["blocks.0.resid_pre"])
    assert torch.equal(cache["blocks.0.resid_post"], cache["blocks.1.resid_pre"])
    for i in MOE_LAYERS.get(family, ()):
        assert ((cache[f"blocks.{i}.moe.weights"] != 0).sum(-1) == TOP_K).all()

    # not detached: every recorded site has a gradient path to the model's parameters
    embedding = m.hf_model.get_input_embeddings().weight
    for name, value in cache.items():
        assert value.requires_grad, name
        (grad,) = torch.autograd.grad(value.float().square().sum(), embedding, retain_graph=True)
        assert grad.abs().sum() > 0, name
    if family in MOE_LAYERS:
        gate = m.hf_model.model.layers[0].mlp.gate.weight
        (grad,) = torch.autograd.grad(cache["blocks.0.moe.router"].sum(), gate, retain_graph=True)
        assert grad.abs().sum() > 0


def test_from_config_seed_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = HFAdapter.from_config("gpt2", CONFIGS["gpt2"], vocab_size=VOCAB, seed=3)
    b = HFAdapter.from_config("gpt2", CONFIGS["gpt2"], vocab_size=VOCAB, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.hf_model.config.vocab_size == VOCAB
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# ---- patching: the adapter's edits against the same edits done by hand ----------------------


def _layer(m: HFAdapter, i: int):
    return m.hf_model.transformer.h[i] if m.family == "gpt2" else m.hf_model.model.layers[i]


def _o_proj(m: HFAdapter, i: int):
    return _layer(m, i).attn.c_proj if m.family == "gpt2" else _layer(m, i).self_attn.o_proj


def _hand_route(m: HFAdapter, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's routing, written out from the transformers source."""
    probs = F.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, TOP_K, dim=-1)
    if m.family == "mixtral" or m.hf_model.config.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    return (top if m.family == "mixtral" else top.to(logits.dtype)), idx


def _hand_site(m: HFAdapter, site: str):
    """(module, kind, read raw -> (B, T, F) flat view, splice(raw, source_flat) -> new raw) for one site,
    editing position 1 (and, for heads, head 2) like ``SiteRef(site, positions=(1,), heads=(2,))``."""
    i = 0
    if site == "resid_post":

        def splice(out, src):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[:, 1] = src[:, 1]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return _layer(m, i), "output", lambda out: out[0] if isinstance(out, tuple) else out, splice
    if site == "mlp.out":

        def splice(out, src):
            out = out.clone()
            out[:, 1] = src[:, 1]
            return out

        return _layer(m, i).mlp, "output", lambda out: out, splice
    if site == "attn.heads":
        cols = slice(2 * DH, 3 * DH)

        def splice(x, src):
            x = x.clone()
            x[:, 1, cols] = src[:, 1, cols]
            return x

        return _o_proj(m, i), "input", lambda x: x, splice
    if site == "moe.router":
        rows = torch.arange(B) * T + 1  # flattened (b, position 1) rows

        def splice(out, src):
            logits = out[0].clone()
            logits[rows] = src[rows]
            return (logits, *_hand_route(m, logits))

        return _layer(m, i).mlp.gate, "output", lambda out: out[0], splice
    raise ValueError(site)


def _run_by_hand(m: HFAdapter, ids: torch.Tensor, site: str, source=None):
    """Forward with a plain hook: records the raw site value, or splices ``source`` in."""
    module, kind, read, splice = _hand_site(m, site)
    seen = {}

    def on_value(value):
        seen["value"] = read(value)
        return None if source is None else splice(value, source)

    if kind == "output":
        handle = module.register_forward_hook(lambda _m, _a, out: on_value(out))
    else:
        handle = module.register_forward_pre_hook(
            lambda _m, args: None if (new := on_value(args[0])) is None else (new, *args[1:])
        )
    try:
        return m(ids), seen["value"]
    finally:
        handle.remove()


PARITY_CASES = [(f, s) for f in FAMILIES for s in ("resid_post", "attn.heads", "mlp.out")]
PARITY_CASES += [(f, "moe.router") for f in MOE_LAYERS]


@pytest.mark.parametrize(("family", "site"), PARITY_CASES)
def test_patch_matches_hand_written_hook(family, site):
    m = model(family)
    base, source = inputs()
    name = f"blocks.0.{site}"
    ref = SiteRef(name, positions=(1,), heads=(2,) if site == "attn.heads" else None)
    with torch.no_grad():
        _, src_cache = sites.run_with(m, source, record=[name])
        clean = m(base)
        patched, _ = sites.run_with(
            m, base, edits={name: lambda t: interventions.patch(t, src_cache[name], ref.mask(t.shape))}
        )
        _, src_raw = _run_by_hand(m, source, site)
        by_hand, _ = _run_by_hand(m, base, site, source=src_raw)
    assert not torch.allclose(patched, clean, atol=1e-4), "the patch should change the logits"
    torch.testing.assert_close(patched, by_hand, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_clean_patch_leaves_logits_unchanged(family):
    m = model(family)
    base, _ = inputs()
    names = list(m.site_points())
    with torch.no_grad():
        clean, cache = sites.run_with(m, base, record=names)
        for name in names:
            full = SiteRef(name)
            patched, _ = sites.run_with(
                m, base, edits={name: lambda t, n=name, r=full: interventions.patch(t, cache[n], r.mask(t.shape))}
            )
            torch.testing.assert_close(patched, clean, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("family", list(MOE_LAYERS))
def test_router_patch_changes_chosen_experts(family):
    m = model(family)
    base, source = inputs()
    experts = m.hf_model.model.layers[0].mlp.experts
    chosen = []  # the expert indices the experts module actually receives
    handle = experts.register_forward_pre_hook(lambda _m, args: chosen.append(args[1].clone()))
    name = "blocks.0.moe.router"
    try:
        with torch.no_grad():
            _, src_cache = sites.run_with(m, source, record=[name])
            m(base)
            sites.run_with(m, base, edits={name: lambda t: src_cache[name]})
    finally:
        handle.remove()
    from_source, from_base, patched = (c.sort(-1).values for c in chosen)
    assert not torch.equal(from_source, from_base)
    assert torch.equal(patched, from_source)  # layer 0 routing depends only on its logits


def test_moe_weights_write_forces_routing():
    m = model("mixtral")
    base, _ = inputs()
    name = "blocks.0.moe.weights"
    with torch.no_grad():
        clean, cache = sites.run_with(m, base, record=[name])
        used = int(cache[name][0, 0].nonzero()[0])  # an expert chosen for the first token
        mask = SiteRef(name, positions=(0,), dims=(used, used + 1)).mask(cache[name].shape)
        edits = {name: lambda t: interventions.zero_ablate(t, mask)}
        ablated, after = sites.run_with(m, base, record=[name], edits=edits)
        assert after[name][0, 0, used] == 0
        assert not torch.allclose(ablated, clean, atol=1e-5)
        with pytest.raises(ConfigError, match="top_k"):
            sites.run_with(m, base, edits={name: lambda t: t + 1.0})


# ---- loading, names, hook hygiene -----------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "mixtral"])
def test_save_and_load_locally(family, tmp_path):
    m = model(family)
    base, _ = inputs()
    m.save_pretrained(tmp_path)
    loaded = HFAdapter.from_pretrained(tmp_path).eval()
    assert loaded.family == family and set(loaded.site_points()) == set(m.site_points())
    with torch.no_grad():
        assert torch.equal(loaded(base), m(base))


def test_from_pretrained_rejects_unsupported_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(UnknownNameError, match="model family 'gpt_neox'.*mixtral"):
        HFAdapter.from_pretrained(tmp_path)


def test_unknown_site_lists_valid_sites_and_hooks_are_cleaned_up():
    m = model("gpt2")
    base, _ = inputs()
    layer = _layer(m, 0)
    calls = []
    user_hook = layer.register_forward_hook(lambda *_: calls.append(1))
    user_pre_hook = layer.register_forward_pre_hook(lambda *_: None)

    def counts() -> tuple[int, int]:  # hooks on the layer and on the modules inside it (its hook points)
        return sum(len(x._forward_hooks) for x in layer.modules()), sum(
            len(x._forward_pre_hooks) for x in layer.modules()
        )

    n_hooks, n_pre_hooks = counts()
    try:
        with pytest.raises(UnknownNameError, match="blocks.0.resid_post") as err:
            sites.run_with(m, base, record=["blocks.0.resid_post", "blocks.9.nope"])
        assert "blocks.0.attn.heads" in str(err.value)
        assert counts() == (n_hooks, n_pre_hooks)

        with sites.hooked(m, record=["blocks.0.resid_post"], edits={"blocks.0.resid_pre": lambda t: t}):
            assert counts() == (n_hooks + 2, n_pre_hooks)  # hook points: forward hooks, both
            m(base)
        assert counts() == (n_hooks, n_pre_hooks)
        assert user_hook.id in layer._forward_hooks and user_pre_hook.id in layer._forward_pre_hooks
        m(base)
        assert len(calls) == 2  # the user's hook ran in both forwards and still runs
    finally:
        user_hook.remove()
        user_pre_hook.remove()
