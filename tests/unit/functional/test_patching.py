"""Activation patching and AtP (faithful_train/functional/patching.py): the batched sweep equals one
hooked forward per cell (every component, heads, padded rows, both directions), AtP is exact where
the metric is linear in the patched activation, the ranking helpers, and parity with
TransformerLens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from faithful_train.functional.patching import (
    COMPONENTS,
    Cell,
    activation_patching,
    answer_metric_fn,
    attribution_patching,
    cpr_cmd,
    missed_share,
    node_effects,
    patching_cells,
    rank_agreement,
)
from faithful_train.intervene.sites import PositionSpec, hooked
from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.tasks.batch import answer_positions, gather_positions
from tests.conftest import tiny_transformer

VOCAB, ANSWERS = 20, (0, 1)


# --- batches ---


def _pad(rows: list[torch.Tensor], left: list[int], right: list[int]) -> dict[str, torch.Tensor]:
    """Rows padded by ``left[b]`` / ``right[b]`` pad tokens (17), with mask and answer positions."""
    T = max(lp + len(r) + q for r, lp, q in zip(rows, left, right))
    ids = torch.full((len(rows), T), 17)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    answer = []
    for b, (row, lp) in enumerate(zip(rows, left)):
        ids[b, lp : lp + len(row)] = row
        mask[b, lp : lp + len(row)] = 1
        answer.append(lp + len(row) - 1)
    return {"input_ids": ids, "attention_mask": mask, "answer_pos": torch.tensor(answer)[:, None]}


def _pairs(padded: bool, seed: int = 0) -> tuple[dict, dict]:
    """Clean rows and corrupted ones (token 1 resampled); padded differently when ``padded``."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 4, 5, 3] if padded else [5] * 4
    clean = [torch.randint(2, 16, (n,), generator=g) for n in lengths]
    corrupted = [r.clone() for r in clean]
    for r in corrupted:
        r[1] = (r[1] + 1 + torch.randint(0, 12, (1,), generator=g)) % 14 + 2
    labels = torch.tensor([0, 1, 1, 0])
    if not padded:
        return {"input_ids": torch.stack(clean), "labels": labels}, {
            "input_ids": torch.stack(corrupted),
            "labels": 1 - labels,
        }
    clean_b = _pad(clean, left=[0, 2, 1, 0], right=[1, 0, 0, 2])
    corrupted_b = _pad(corrupted, left=[1, 0, 0, 2], right=[0, 0, 1, 0])
    return clean_b | {"labels": labels}, corrupted_b | {"labels": 1 - labels}


# --- the reference: one hooked forward per cell, positions found by hand ---


def _where(position, batch: dict, b: int) -> list[int]:
    """Positions of ``position`` in row ``b`` (only those on its real tokens)."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[b]
    real = mask.nonzero()[:, 0].tolist()
    answer = int(answer_positions(batch)[b, 0])
    if isinstance(position, PositionSpec):
        p = answer + position.offset
    else:
        p = real[0] + position if position >= 0 else answer + 1 + position
    return [p] if 0 <= p < mask.shape[0] and mask[p] else []


def _reference(model, clean, corrupted, cells, metric_fn, direction):
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)

    def forward(batch, edits=None, record=()):
        with hooked(model, record=record, edits=edits) as cache:
            logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return gather_positions(logits, answer_positions(batch))[:, 0], cache

    with torch.no_grad():
        clean_logits, _ = forward(clean)
        values = []
        for cell in cells:
            _, cache = forward(source, record=[cell.site])
            src = cache[cell.site]

            def edit(t, cell=cell, src=src):
                t = t.clone()
                for b in range(t.shape[0]):
                    for p, q in zip(_where(cell.position, base, b), _where(cell.position, source, b)):
                        if cell.head is None:
                            t[b, p] = src[b, q]
                        else:
                            t[b, p, cell.head] = src[b, q, cell.head]
                return t

            logits, _ = forward(base, edits={cell.site: edit})
            values.append(metric_fn(logits[None], clean_logits)[0])
    return torch.stack(values)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_batched_sweep_equals_one_forward_per_cell(component, padded, direction):
    model = tiny_transformer(VOCAB).eval()
    clean, corrupted = _pairs(padded)
    positions = [0, 1, 3, 4, -1, "answer-1"]
    cells = patching_cells(model, [component], positions)
    metric_fn = answer_metric_fn("logit_diff", clean["labels"], ANSWERS)
    with torch.no_grad():
        result = activation_patching(model, clean, corrupted, cells, metric_fn, direction)
    reference = _reference(model, clean, corrupted, cells, metric_fn, direction)
    torch.testing.assert_close(result.values, reference, atol=1e-5, rtol=1e-5)
    assert result.values.shape == (len(cells), 4)
    base = result.corrupted if direction == "denoising" else result.clean
    assert (result.values - base).abs().max() > 1e-3  # some cell matters
    # a cell at position 0 (identical in both inputs, before the resampled token) changes nothing
    zero = [i for i, c in enumerate(cells) if c.position == 0 and c.layer == 0]
    torch.testing.assert_close(result.values[zero], base.expand(len(zero), -1), atol=1e-5, rtol=1e-5)


def test_scores_are_normalised_between_corrupted_and_clean():
    model = tiny_transformer(VOCAB).eval()
    clean, corrupted = _pairs(False)
    metric_fn = answer_metric_fn("logit_diff", clean["labels"], ANSWERS)
    # only token 1 differs: patching block 0's input there turns the corrupted run into the clean one
    with torch.no_grad():
        whole = activation_patching(
            model, clean, corrupted, [Cell("resid_pre", 0, 1), Cell("resid_pre", 0, 2)], metric_fn
        )
    torch.testing.assert_close(whole.values[0], whole.clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole.values[1], whole.corrupted, atol=1e-5, rtol=1e-5)
    assert whole.scores().tolist() == pytest.approx([1.0, 0.0], abs=1e-4)


# --- AtP ---


class LinearSites(nn.Module):
    """A one-block model that is linear in every site: embedding, per-head causal averaging of a
    value projection (``attn.heads``), output projection (``attn.out``), a linear "MLP", readout."""

    n_layers = 1

    def __init__(self, vocab: int = VOCAB, d: int = 8, heads: int = 2, T: int = 8):
        super().__init__()
        self.cfg = SimpleNamespace(n_heads=heads, d_model=d)
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.v, self.o, self.mlp, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, vocab)
        self.hooks = nn.ModuleDict({k: HookPoint() for k in ("resid_pre", "heads", "attn_out", "mlp_out")})

    def forward(self, input_ids, attention_mask=None, positions=None, narrow=True):
        B, T = input_ids.shape
        mask = torch.ones(B, T) if attention_mask is None else attention_mask.float()
        x = self.hooks["resid_pre"](self.emb(input_ids) + self.pos((mask.cumsum(1) - 1).clamp_min(0).long()))
        weights = torch.tril(torch.ones(T, T))[None] * mask[:, None, :]
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
        z = self.hooks["heads"](torch.einsum("bqk,bkhd->bqhd", weights, self.v(x).view(B, T, self.cfg.n_heads, -1)))
        x = x + self.hooks["attn_out"](self.o(z.flatten(2)))
        x = x + self.hooks["mlp_out"](self.mlp(x))
        logits = self.out(x)
        return logits if positions is None else gather_positions(logits, positions)

    def site_points(self):
        names = {"resid_pre": "resid_pre", "attn.heads": "heads", "attn.out": "attn_out", "mlp.out": "mlp_out"}
        return {f"blocks.0.{site}": SitePoint(self.hooks[hook]) for site, hook in names.items()}


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_atp_is_exact_on_a_model_linear_in_the_patched_activation(padded, direction):
    torch.manual_seed(0)
    model = LinearSites()
    for p in model.parameters():  # frozen weights: AtP still takes gradients at the activations
        p.requires_grad_(False)
    clean, corrupted = _pairs(padded)
    cells = patching_cells(model, COMPONENTS, [0, 1, 2, 3, -1])
    metric_fn = answer_metric_fn("logit_diff", clean["labels"], ANSWERS)  # two answers: linear in the logits
    with torch.no_grad():
        exact = activation_patching(model, clean, corrupted, cells, metric_fn, direction)
        estimated = attribution_patching(model, clean, corrupted, cells, metric_fn, direction)
    torch.testing.assert_close(estimated.values, exact.values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(estimated.clean, exact.clean)
    assert exact.effects().abs().max() > 1e-2
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_atp_is_the_derivative_of_patching_along_the_interpolation(padded):
    """On a nonlinear model, AtP's estimate of a cell is d/dε m(a_base + ε (a_source - a_base))
    at ε = 0 (central differences in float64)."""
    model = tiny_transformer(VOCAB).double().eval()
    clean, corrupted = _pairs(padded)
    cells = patching_cells(model, COMPONENTS, [1, 2, -1])
    metric_fn = lambda logits, _clean: logits[..., 0] - logits[..., 1]  # noqa: E731  (float64; answer_metric is float32)
    estimated = attribution_patching(model, clean, corrupted, cells, metric_fn).effects()
    eps = 1e-5

    def forward(batch, edits=None, record=()):
        with torch.no_grad(), hooked(model, record=record, edits=edits) as cache:
            logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return gather_positions(logits, answer_positions(batch))[:, 0], cache

    clean_logits, _ = forward(clean)
    for k, cell in enumerate(cells):
        _, source = forward(clean, record=[cell.site])
        _, base = forward(corrupted, record=[cell.site])
        moved = []
        for sign in (1, -1):

            def edit(t, sign=sign, cell=cell, source=source, base=base):
                t = t.clone()
                for b in range(t.shape[0]):
                    for p, q in zip(_where(cell.position, corrupted, b), _where(cell.position, clean, b)):
                        where = (b, p) if cell.head is None else (b, p, cell.head)
                        t[where] += (
                            sign * eps * (source[cell.site][(b, q, cell.head)[: len(where)]] - base[cell.site][where])
                        )
                return t

            moved.append(metric_fn(forward(corrupted, {cell.site: edit})[0][None], clean_logits)[0])
        torch.testing.assert_close(estimated[k], (moved[0] - moved[1]) / (2 * eps), atol=1e-8, rtol=1e-6, msg=cell.name)


def test_atp_is_close_to_exact_patching_on_a_tiny_transformer():
    model = tiny_transformer(VOCAB).eval()
    clean, corrupted = _pairs(False)
    cells = patching_cells(model, COMPONENTS, range(5))
    metric_fn = answer_metric_fn("logit_diff", clean["labels"], ANSWERS)
    with torch.no_grad():
        exact = activation_patching(model, clean, corrupted, cells, metric_fn).effects().mean(1)
    estimated = attribution_patching(model, clean, corrupted, cells, metric_fn).effects().mean(1)
    before = torch.tensor([c.position == 0 for c in cells])  # identical activations in both runs
    assert exact[before].abs().max() < 1e-5 and estimated[before].abs().max() < 1e-5
    at_token = torch.tensor([c.component == "resid_pre" and c.layer == 0 and c.position == 1 for c in cells])
    assert float(estimated[at_token]) == pytest.approx(float(exact[at_token]), rel=0.3)
    assert rank_agreement(exact, estimated) > 0.8
    assert all(p.grad is None for p in model.parameters())


def test_ranking_helpers():
    exact = torch.tensor([3.0, -2.0, 0.1, 0.0])
    assert missed_share(exact, torch.tensor([3.0, 0.0, 2.0, 0.0]), 2) == 0.5  # |-2| missed
    assert missed_share(exact, torch.tensor([-1.0, 5.0, 0.0, 0.0]), 2) == 0.0  # by magnitude
    assert rank_agreement(exact, exact * 2) == pytest.approx(1.0)
    cpr, cmd = cpr_cmd([0, 1, 2], 2, [0.0, 1.0, 1.0])
    assert cpr == pytest.approx(0.75) and cmd == pytest.approx(0.25)
    model = tiny_transformer(VOCAB)
    from faithful_train.functional.circuits import components

    universe = components(model)
    cells = [Cell("heads", 1, 0, 2), Cell("heads", 1, 3, 2), Cell("mlp.out", 0, 1), Cell("resid_pre", 0, 1)]
    scores = node_effects(cells, torch.tensor([1.0, -0.25, 2.0, 9.0]), universe)
    named = {u.name + str(u.heads): float(s) for u, s in zip(universe, scores)}
    assert (
        named["blocks.1.attn.heads(2,)"] == 0.75
        and named["blocks.0.mlp.outNone"] == 2.0
        and sum(named.values()) == 2.75
    )


# --- parity with TransformerLens (a peer installed beside the venv: make .bench/transformer_lens) ---


def test_maps_equal_transformer_lens_on_the_same_weights(tmp_path, repo):
    """Our four maps (on our transformer, and on the same weights as a Hugging Face GPT-2 behind
    ``HFAdapter``) equal TransformerLens's ``get_act_patch_*`` (run in a process of its own, so
    its packages never enter this one), both directions. Skipped without TransformerLens."""
    from benchmarks.patching import make_inputs, make_models, our_maps
    from tests.conftest import run_peer

    ours, wrapped = make_models(tmp_path / "gpt2", n_layers=2)
    clean, corrupted = make_inputs(batch=4, length=8)
    answers = (3, 7)
    torch.save(
        {"model_dir": str(tmp_path / "gpt2"), "clean": clean, "corrupted": corrupted, "answers": answers},
        tmp_path / "in.pt",
    )
    run_peer(
        ["benchmarks/patching.py", "--tl-maps", str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        "TL_LIB",
        "TransformerLens",
    )
    theirs = torch.load(tmp_path / "out.pt")
    for direction in ("denoising", "noising"):
        for name, model in (("ours", ours), ("gpt2", wrapped)):
            maps = our_maps(model, clean, corrupted, answers, direction=direction)
            for component, value in maps.items():
                expected = theirs[f"{direction}/{component}"]
                assert value.shape == expected.shape == ((2, 8, 4) if component == "heads" else (2, 8))
                torch.testing.assert_close(value, expected, atol=1e-4, rtol=0, msg=f"{name} {direction} {component}")
                assert expected.max() - expected.min() > 0.05  # the map is not flat
