"""The concept bottleneck in a model: what the head can read in each mode (checked by patching),
the partial forwards audits and objectives use, cut blocks, Hugging Face backbones, and the
side channel's resumable training noise."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.intervene.engine import plan_resume
from faithful_train.intervene.sites import hooked, run_with
from faithful_train.modeling import build_model
from faithful_train.modeling.bottleneck import BottleneckModel
from faithful_train.modeling.concept_layout import ConceptLayout
from faithful_train.modeling.hf import HFAdapter
from faithful_train.tasks.concept_objects import ConceptObjects

TASK = ConceptObjects()
TINY = dict(arch="transformer", d_model=32, n_layers=2, n_heads=4, d_mlp=64)


def make(mode: str = "hard", seed: int = 0, **bottleneck) -> BottleneckModel:
    torch.manual_seed(seed)
    section = OmegaConf.create(TINY | {"bottleneck": {"mode": mode, **bottleneck}})
    return build_model(section, TASK.vocab_size, TASK.seq_len, seed=seed, concepts=TASK.concepts).eval()


def batch(n: int = 16, seed: int = 0):
    return TASK.sample(n, seed)


@pytest.mark.parametrize("mode", ["hard", "hybrid", "embedding"])
def test_forward_and_sites(mode):
    model = make(mode)
    out = model(batch()["input_ids"])
    assert out.shape == (16, 1, TASK.vocab_size)
    sites = model.site_points()
    assert {"bottleneck.logits", "bottleneck.concepts", "blocks.1.resid_post", "embed"} <= set(sites)
    assert "final" not in sites
    assert ("bottleneck.side" in sites) == (mode == "hybrid") and ("bottleneck.embeddings" in sites) == (
        mode == "embedding"
    )
    _, cache = run_with(model, batch()["input_ids"], record=model.bottleneck.site_points())
    assert cache["bottleneck.concepts"].shape == (16, 1, model.layout.n_units)


def _same_answer_for_any_input(model: BottleneckModel, pinned: list[str]) -> bool:
    """Pin ``pinned`` bottleneck sites to the values of one example: does the answer still
    depend on the input?"""
    a, b = batch(16, 1)["input_ids"], batch(16, 2)["input_ids"]
    _, cache = run_with(model, a[:1], record=pinned)
    edits = {site: (lambda v, s=site: cache[s].expand_as(v)) for site in pinned}
    with hooked(model, edits=edits):
        return torch.allclose(model(a), model(b))


def test_hard_head_reads_only_the_concepts():
    assert _same_answer_for_any_input(make("hard"), ["bottleneck.concepts"])


def test_hybrid_head_also_reads_its_side_channel():
    model = make("hybrid")
    assert not _same_answer_for_any_input(model, ["bottleneck.concepts"])
    assert _same_answer_for_any_input(model, ["bottleneck.concepts", "bottleneck.side"])


def test_embedding_head_reads_concepts_and_value_embeddings():
    model = make("embedding")
    assert not _same_answer_for_any_input(model, ["bottleneck.concepts"])
    assert _same_answer_for_any_input(model, ["bottleneck.concepts", "bottleneck.embeddings"])


@pytest.mark.parametrize("mode", ["hard", "hybrid", "embedding"])
def test_readout_from_recorded_sites_equals_a_patched_full_forward(mode):
    model = make(mode)
    ids = batch()["input_ids"]
    _, cache = run_with(model, ids, record=model.bottleneck.site_points())
    new = torch.rand_like(cache["bottleneck.concepts"][:, -1])
    with hooked(model, edits={"bottleneck.concepts": lambda v: new[:, None]}):
        full = model(ids)[:, -1]
    torch.testing.assert_close(model.readout_from(cache, new), full)


def test_cut_blocks_do_not_run_and_resume_parity():
    model = make("hard", layer=0)
    assert model.n_layers == 1 and "blocks.1.resid_pre" not in model.site_points()
    ran = []
    model.backbone.blocks[1].register_forward_hook(lambda *a: ran.append(1))
    ids = batch()["input_ids"]
    logits, cache = run_with(model, ids, record=["blocks.0.resid_pre"])
    assert not ran
    torch.testing.assert_close(model.forward_from(0, cache["blocks.0.resid_pre"]), logits)
    plan = plan_resume(model, ["blocks.0.attn.out"])
    assert plan is not None and plan.layer == 0
    with pytest.raises(UnknownNameError, match="blocks.0.resid_post"):
        run_with(model, ids, record=["blocks.1.mlp.out"])


def test_discrete_concepts_are_zero_one_and_still_train_the_encoder():
    model = make("hard", discrete=True).train()
    ids, labels = batch()["input_ids"], batch()["labels"]
    _, cache = run_with(model, ids, record=["bottleneck.concepts"])
    units = cache["bottleneck.concepts"]
    read = model.bottleneck.head_input(units)
    assert set(read.unique().tolist()) <= {0.0, 1.0}
    torch.nn.functional.cross_entropy(model(ids)[:, -1], labels).backward()
    assert model.bottleneck.concept_logits.weight.grad.abs().sum() > 0


def test_side_noise_only_in_training_and_resumable():
    model = make("hybrid").train()
    ids = batch()["input_ids"]
    resumed = copy.deepcopy(model)
    first, second = model(ids), model(ids)
    assert not torch.allclose(first, second) and int(model.bottleneck.noise_draws) == 2
    torch.testing.assert_close(resumed(ids), first)  # same draw counter, same noise
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))


def test_hugging_face_backbone_stops_at_the_bottleneck_layer_and_resumes():
    backbone = HFAdapter.from_config(
        "llama",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=16,
        ),
        vocab_size=TASK.vocab_size,
        seed=0,
    ).eval()
    layout = ConceptLayout.from_task(TASK.concepts)
    model = BottleneckModel(backbone, layout, TASK.vocab_size, layer=1, mode="hybrid").eval()
    ran = []
    backbone.hf_model.model.layers[2].register_forward_hook(lambda *a: ran.append(1))
    backbone.hf_model.model.norm.register_forward_hook(lambda *a: ran.append(1))
    ids = batch()["input_ids"]
    out = model(ids)
    assert not ran and out.shape == (16, 1, TASK.vocab_size)
    hidden = backbone.hf_model(ids, output_hidden_states=True).hidden_states[2][:, -1:]  # after layer 1
    torch.testing.assert_close(out, model.bottleneck(hidden))
    plan = plan_resume(model, ["blocks.0.resid_post"])  # a Hugging Face backbone resumes too
    assert plan is not None and plan.layer == 1
    resumed = model.forward_from(1, model.forward_to(1, ids))
    torch.testing.assert_close(resumed, out, atol=1e-5, rtol=0)
    # an edit below the bottleneck still reaches it
    with hooked(model, edits={"blocks.0.resid_post": lambda v: torch.zeros_like(v)}):
        assert not torch.allclose(model(ids), out)


def test_bad_bottleneck_config_is_a_config_error():
    with pytest.raises(UnknownNameError, match="bottleneck mode 'soft'; valid: embedding, hard, hybrid"):
        make("soft")
    with pytest.raises(ConfigError, match="side_width"):
        make("hybrid", side_width=0)
    with pytest.raises(ConfigError, match="out of range"):
        make("hard", layer=5)
    with pytest.raises(UnknownNameError, match="concept for model.bottleneck 'weight'"):
        make("hard", concepts=["colour", "weight"])
