"""The attribution audit on planted models whose answers are known: a bag-of-tokens linear
model (integrated gradients exact, removal effects equal to attributions, order-invariant), the
same with position-dependent weights (order matters), and a tiny transformer trained on a task
that reads one position (its attributions must depend on its weights)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from faithful_train.audits.attribution import AttributionAudit, irrelevant_share, randomisation_correlation
from faithful_train.errors import UnknownNameError
from faithful_train.functional.attribution import METHODS
from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.registry import AUDITS
from faithful_train.tasks.base import Task
from faithful_train.tasks.batch import gather_positions
from faithful_train.tasks.concept_objects import ConceptObjects
from tests.conftest import tiny_transformer
from tests.unit.bag_of_tokens import BagOfTokens


class PickTask(Task):
    """The answer is the class of the token at position 1; the rest is noise, then ``?``."""

    name = "pick"

    @property
    def vocab_size(self) -> int:
        return 12

    @property
    def seq_len(self) -> int:
        return 6

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return (0, 1, 2, 3)

    def generate(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids = torch.randint(4, 11, (n, self.seq_len), generator=generator)
        ids[:, -1] = 11
        value = (ids[:, 1] - 4) % 4
        return {"input_ids": ids, "labels": value, "var/x": value}

    def label_from_variables(self, variables: dict[str, torch.Tensor]) -> torch.Tensor:
        return variables["x"]


def run(model: nn.Module, task: Task, n: int = 64, **kwargs) -> dict[str, float]:
    audit = AttributionAudit(n_examples=n, batch_size=n, **({"steps": 8} | kwargs))
    audit.bind(model, task)
    return audit.evaluate(model, task)


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, PickTask]:
    """A tiny transformer trained to read position 1 (perfect after a few dozen steps)."""
    task = PickTask()
    model = tiny_transformer(task.vocab_size, max_seq_len=task.seq_len)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = task.generate(64, g)
        loss = nn.functional.cross_entropy(model(batch["input_ids"])[:, -1], batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), task


# --- the registry ---


def test_registered():
    assert AUDITS["attribution"] == "faithful_train.audits.attribution:AttributionAudit"


# --- the linear, order-invariant model: every figure known ---


def test_linear_model_is_complete_calibrated_and_stable():
    task = ConceptObjects(n_noise=0)  # distinct tokens: no ties in any ranking
    r = run(BagOfTokens(task.vocab_size), task)
    assert r["task_acc"] >= 0.0 and r["completeness_error"] < 1e-9  # IG exact on a linear model
    assert r["calibration"] == pytest.approx(1.0, abs=1e-9)  # removing a token costs its attribution
    assert r["stability/spearman"] == pytest.approx(1.0, abs=1e-9)  # same tokens, any order
    assert r["stability/topk"] == pytest.approx(1.0, abs=1e-9)
    assert r["stability/cosine"] == pytest.approx(1.0, abs=1e-6)
    assert r["eraser/comprehensiveness"] > 0  # the top tokens carry the answer's probability


def test_gradient_x_input_is_exact_on_a_linear_model_too():
    task = ConceptObjects(n_noise=0)
    r = run(BagOfTokens(task.vocab_size), task, method="gradient_x_input", randomisation=False)
    assert r["completeness_error"] < 1e-9 and r["calibration"] == pytest.approx(1.0, abs=1e-9)


def test_position_dependent_model_is_unstable():
    task = ConceptObjects(n_noise=0)
    scales = torch.randn(task.seq_len, generator=torch.Generator().manual_seed(3)).double()
    r = run(BagOfTokens(task.vocab_size, scales=scales), task)
    assert r["completeness_error"] < 1e-9 and r["calibration"] == pytest.approx(1.0, abs=1e-9)  # still linear
    assert r["stability/spearman"] < 0.6 and r["stability/topk"] < 0.8 and r["stability/cosine"] < 0.8


def test_irrelevant_share_is_the_attribution_mass_on_marked_tokens():
    attr = torch.tensor([[1.0, -3.0, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    marked = torch.tensor([[True, True, False, False], [True, False, False, False]])
    assert irrelevant_share(attr, marked).tolist() == [0.5, 0.0]
    # a linear model: with the noise and pattern tokens' embeddings zeroed it reads none of
    # them, and the figure is exactly 0; with them, it is their share
    task = ConceptObjects()
    blind = BagOfTokens(task.vocab_size)
    with torch.no_grad():
        blind.emb.weight[task.noise_token0 : task.noise_token0 + task.noise_vocab] = 0
        blind.emb.weight[task.attribute_token0["pattern"] : task.attribute_token0["pattern"] + 2] = 0
    assert run(blind, task, randomisation=False)["irrelevant_share"] == 0.0
    assert run(BagOfTokens(task.vocab_size), task, randomisation=False)["irrelevant_share"] > 0.2


def test_eraser_equals_a_hand_computation():
    task = ConceptObjects(n_noise=0)
    model = BagOfTokens(task.vocab_size)
    audit = AttributionAudit(n_examples=32, batch_size=32, steps=4, eraser_fractions=(0.5,), randomisation=False)
    audit.bind(model, task)
    r = audit.evaluate(model, task)
    data = audit.data(task)
    ids, y = data["input_ids"], data["labels"]
    e = model.emb.weight[ids].detach()  # (B, T, D)
    attr = (e * model.readout.weight[y][:, None].detach()).sum(-1)  # exact IG of the logit: e_t . w_y
    k = math.ceil(0.5 * ids.shape[1])
    top = torch.zeros_like(attr, dtype=torch.bool).scatter(1, attr.topk(k, dim=1).indices, True)

    def p(kept: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model.readout((e * kept[..., None]).sum(1))
        return logits.softmax(-1).gather(1, y[:, None]).squeeze(1)

    full = p(torch.ones_like(top))
    assert r["eraser/comprehensiveness"] == pytest.approx((full - p(~top)).mean().item(), abs=1e-6)
    assert r["eraser/sufficiency"] == pytest.approx((full - p(top)).mean().item(), abs=1e-6)
    assert r["eraser/comprehensiveness"] > 0


# --- cascading randomisation ---


def test_randomisation_separates_a_trained_model_from_a_weight_blind_attribution(trained):
    model, task = trained
    audit = AttributionAudit(n_examples=64, batch_size=64, steps=8, stability=False)
    audit.bind(model, task)
    r = audit.evaluate(model, task)
    assert r["task_acc"] == 1.0
    assert r["eraser/comprehensiveness"] > 0.5 and r["eraser/sufficiency"] < 0.1  # it reads what IG points at
    assert r["randomisation/spearman"] < 0.6 and r["randomisation/spearman"] == r["randomisation/top3"]
    assert all(r[f"randomisation/top{n}"] < 0.8 for n in (1, 2, 3))
    # the same check on an attribution that ignores the weights: 1 at every stage
    ids, y = audit.data(task)["input_ids"], audit.data(task)["labels"]
    copies = audit.randomised_models(model)
    by_position = lambda m, x, t: torch.arange(x.shape[1], dtype=torch.float64).expand(x.shape)  # noqa: E731
    by_token = lambda m, x, t: x.double().sin()  # noqa: E731
    for blind in (by_position, by_token):
        rho = randomisation_correlation(blind, model, copies, ids, y)
        assert rho.shape == (3, 64) and torch.all(rho == 1.0)


# --- names and the whole audit on a transformer ---


def test_bad_names_list_the_valid_ones():
    with pytest.raises(UnknownNameError, match="attribution method 'saliency'") as info:
        AttributionAudit(method="saliency")
    assert info.value.valid == sorted(METHODS)
    with pytest.raises(UnknownNameError, match="attribution output 'prob'") as info:
        AttributionAudit(output="prob")
    assert info.value.valid == ["logit", "logprob"]
    with pytest.raises(UnknownNameError, match="metric of audit 'attribution' 'randomisation/top9'"):
        AttributionAudit(thresholds={"randomisation/top9": "< 0.5"}).bind(tiny_transformer(20), PickTask())


def test_audit_on_a_transformer_with_concept_objects():
    task = ConceptObjects()
    model = tiny_transformer(task.vocab_size, max_seq_len=task.seq_len)
    model.train()
    thresholds = {"randomisation/spearman": "< 0.5"}
    audit = AttributionAudit(n_examples=48, batch_size=32, steps=4, top_k=3, thresholds=thresholds)
    audit.bind(model, task)
    rng = torch.random.get_rng_state()
    r = audit.evaluate(model, task)
    assert set(r) == set(audit.metric_names(task)) and "stability/topk" in r and "randomisation/top3" in r
    assert all(math.isfinite(v) for v in r.values())
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)
    assert audit.evaluate(model, task) == r  # a fixed audit set, fixed randomised copies
    logprob = run(model, task, n=16, output="logprob", steps=4)
    assert all(math.isfinite(v) for v in logprob.values())
    no_perturbations = AttributionAudit(n_examples=8, steps=4)
    no_perturbations.bind(model, PickTask())
    assert "stability/spearman" not in no_perturbations.metric_names(PickTask())


class Steep(nn.Module):
    """``logit = tanh(sharpness * (s - 1))`` for every class, ``s`` the sum of the ``embed``
    activation, which is 2 on every input: the integrated-gradients path from the zero baseline
    crosses a step of width ~1 / sharpness at its middle. A gentle step needs a few points, a
    steep one many, a cliff more than any cap."""

    def __init__(self, sharpness: float, vocab: int = 12, d: int = 4, seq_len: int = 6):
        super().__init__()
        self.sharpness = sharpness
        self.emb = nn.Embedding(vocab, d)
        with torch.no_grad():
            self.emb.weight.fill_(2.0 / (seq_len * d))
        self.hook_embed = HookPoint()
        self.double()

    def site_points(self) -> dict[str, SitePoint]:
        return {"embed": SitePoint(self.hook_embed)}

    def forward(self, input_ids: torch.Tensor, attention_mask=None, positions=None, narrow=True) -> torch.Tensor:
        s = self.hook_embed(self.emb(input_ids)).sum((1, 2))
        logits = torch.tanh(self.sharpness * (s - 1))[:, None, None].expand(-1, input_ids.shape[1], 12)
        return logits if positions is None else gather_positions(logits, positions)


def _integration_only(**kwargs) -> dict:
    return {"randomisation": False, "stability": False, "calibration": False, "eraser_fractions": ()} | kwargs


def test_points_are_added_until_the_attributions_are_complete():
    task = PickTask()
    fixed = run(Steep(20.0), task, n=16, **_integration_only(max_completeness_error=None))
    adaptive = run(Steep(20.0), task, n=16, **_integration_only())
    assert fixed["completeness_error"] > 0.05  # 8 points miss the step
    assert adaptive["completeness_error"] <= 0.05 and adaptive["trusted"] == 1.0
    assert 8 < adaptive["steps"] <= 512
    assert "trusted" not in fixed and "steps" not in fixed


def test_attributions_that_cannot_be_completed_are_flagged_untrusted():
    from faithful_train.training.rundir import build_summary, format_summary

    task = PickTask()
    audit = AttributionAudit(n_examples=16, batch_size=16, steps=8, max_steps=64, **_integration_only())
    model = Steep(1e4)
    audit.bind(model, task)
    results = audit.evaluate(model, task)
    assert results["completeness_error"] > 0.05 and results["trusted"] == 0.0 and results["steps"] == 64
    audit.remember(results, step=10)
    summary = build_summary({}, [audit], 10)
    assert summary["metrics"]["audit/attribution/trusted"] == 0.0
    assert len(summary["warnings"]) == 1 and "not trusted" in format_summary(summary)


def test_gradient_x_input_has_no_tolerance_to_meet():
    task = PickTask()
    results = run(Steep(20.0), task, n=16, **_integration_only(method="gradient_x_input"))
    assert "trusted" not in results and results["completeness_error"] > 0.05
