"""Sparse autoencoders (``faithful_train/intervene/sae.py``): the maths (TopK, BatchTopK, JumpReLU,
ReLU; FVU; AuxK; unit-norm decoder), SAELens's files, and latents as a site whose writes change
only what they encode."""

from __future__ import annotations

import json

import pytest
import torch

from faithful_train.errors import DataError
from faithful_train.intervene.sae import SparseAutoencoder, load_saelens, save_saelens
from faithful_train.intervene.sites import run_with
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer


def test_topk_keeps_k_latents_and_fvu_is_sparsifys():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32, k=4)
    x = torch.randn(50, 8)
    out = sae(x)
    assert ((out.latents > 0).sum(-1) <= 4).all() and out.l0 <= 4
    pre = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    values, index = pre.topk(4, dim=-1)
    recon = torch.zeros_like(pre).scatter(-1, index, values) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.reconstruction, recon)
    expected = (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, expected)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))  # unit-norm rows from the start


def test_auxk_trains_the_decoder_only_and_only_with_dead_latents():
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 32, k=2)
    x = torch.randn(40, 8)
    assert sae(x).auxk == 0  # no dead mask: no AuxK
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    out = sae(x, dead_mask=dead)
    assert out.auxk > 0
    out.auxk.backward()
    assert (
        sae.W_dec.grad.abs().sum() > 0 and sae.encoder.weight.grad is None and sae.b_dec.grad is None
    )  # sparsify: decoder weights only
    assert sae.W_dec.grad[10:].abs().sum() == 0  # only dead latents' rows


def test_unit_norm_decoder_upkeep():
    sae = SparseAutoencoder(8, 16, k=2)
    sae.W_dec.grad = torch.randn(16, 8)
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-5, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))


def test_batch_topk_jumprelu_and_relu():
    torch.manual_seed(0)
    x = torch.randn(30, 8)
    batch = SparseAutoencoder(8, 32, k=3, activation="batch_topk")
    z = batch(x).latents
    assert int((z > 0).sum()) <= 3 * 30 and (z > 0).sum(-1).max() > 3  # k per row on average, not each
    batch.eval()
    assert ((batch(x).latents > 0) == (batch.pre_acts(x) > batch.threshold_estimate)).all()
    jump = SparseAutoencoder(8, 32, k=1, activation="jumprelu", jump_threshold=0.05, jump_bandwidth=0.5)
    out = jump(x)
    pre = jump.pre_acts(x)
    torch.testing.assert_close(out.latents, pre * (pre > 0.05))
    out.sparsity.backward()  # the L0 estimate reaches the thresholds through the straight-through estimator
    assert jump.log_threshold.grad is not None and jump.log_threshold.grad.abs().sum() > 0
    relu = SparseAutoencoder(8, 32, k=1, activation="relu")
    out = relu(x)
    torch.testing.assert_close(out.latents, relu.pre_acts(x))
    torch.testing.assert_close(out.sparsity, (out.latents * relu.W_dec.norm(dim=1)).sum(-1).mean())


@pytest.mark.parametrize("activation", ["topk", "jumprelu", "relu", "batch_topk"])
def test_saelens_files_round_trip_exactly(tmp_path, activation):
    torch.manual_seed(1)
    sae = SparseAutoencoder(8, 24, k=3, activation=activation)
    x = torch.randn(20, 8)
    sae.train()
    sae(x)  # batch_topk: a threshold estimate
    with torch.no_grad():
        sae.b_dec.add_(0.1)
        sae.encoder.bias.add_(0.05)
    sae.eval()
    save_saelens(sae, tmp_path / "sae", "blocks.0.resid_post")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (
        cfg["metadata"]["hook_name"] == "blocks.0.resid_post"
        and cfg["d_sae"] == 24
        and cfg["metadata"]["sae_lens_version"].startswith("6.")
    )
    assert (
        cfg["architecture"]
        == {"topk": "topk", "jumprelu": "jumprelu", "batch_topk": "jumprelu", "relu": "standard"}[activation]
    )
    loaded, _ = load_saelens(tmp_path / "sae", d_in=8)
    loaded.eval()
    assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)
    assert torch.equal(loaded(x).latents, sae(x).latents)


def test_bad_sae_files_are_one_line(tmp_path):
    sae = SparseAutoencoder(8, 16, k=2)
    save_saelens(sae, tmp_path / "sae", "blocks.0.resid_post")
    with pytest.raises(DataError, match="reads 8 dimensions, the site has 64"):
        load_saelens(tmp_path / "sae", d_in=64)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sae.safetensors").write_bytes(b"x")  # sparsify's layout, not SAELens's
    with pytest.raises(DataError, match="not an SAE in SAELens's layout .*sae.safetensors"):
        load_saelens(tmp_path / "other")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg["metadata"]["sae_lens_version"] = "5.9.1"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError, match="not a SAELens 6.x config"):
        load_saelens(tmp_path / "sae")


def test_latents_are_a_site_whose_writes_change_only_what_they_encode():
    from faithful_train.errors import UnknownNameError
    from faithful_train.intervene.engine import run_variants
    from faithful_train.intervene.sites import attach_featurizer

    torch.manual_seed(0)
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len).eval()
    sae = SparseAutoencoder(32, 64, k=4)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    name = attach_featurizer(model, "blocks.0.resid_post", sae)
    assert name == "blocks.0.resid_post.sae"
    ids = task.sample(8, 0)["input_ids"]
    clean, cache = run_with(model, ids, record=["blocks.0.resid_post", name])
    torch.testing.assert_close(cache[name], sae.encode(cache["blocks.0.resid_post"]))  # (B, T, F) latents
    assert cache[name].shape == (8, ids.shape[1], 64)
    same, _ = run_with(model, ids, edits={name: lambda z: z})
    torch.testing.assert_close(same, clean, atol=1e-5, rtol=1e-5)  # the error term keeps the rest

    latent = int(cache[name][:, -1].abs().sum(0).argmax())  # an active latent

    def off(z):
        z = z.clone()
        z[..., latent] = 0
        return z

    _, edited = run_with(model, ids, record=["blocks.1.resid_pre"], edits={name: off})  # what flows on
    expected = cache["blocks.0.resid_post"] - cache[name][..., latent, None] * sae.W_dec[latent]
    torch.testing.assert_close(
        edited["blocks.1.resid_pre"], expected, atol=1e-5, rtol=1e-5
    )  # exactly that latent's part
    _, base = run_with(
        model, ids, record=["blocks.0.resid_post"], edits={name: off}
    )  # the base site, recorded after the edit
    torch.testing.assert_close(base["blocks.0.resid_post"], expected, atol=1e-5, rtol=1e-5)
    # as a variant of the engine (resumed at block 0), the same logits as the hooked run
    batch = {"input_ids": ids, "labels": task.sample(8, 0)["labels"]}
    hooked_logits, _ = run_with(model, ids, edits={name: off})
    variant = run_variants(model, batch, 1, {name: lambda t, _v: off(t)})
    torch.testing.assert_close(variant[:, 0], hooked_logits[:, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(UnknownNameError, match="blocks.0.resid_post.sae"):
        run_with(model, ids, record=["blocks.1.resid_post.sae"])
