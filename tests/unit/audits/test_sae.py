"""The ``sae`` audit: reconstruction figures (FVU, CE and KL recovered) on planted SAEs whose figures
are known, and its AUROC, latent IIA and causal latent selection on a planted model whose latents
are known (padded, multi-token text rows included)."""

from __future__ import annotations

import math

import pytest
import torch

from faithful_train.audits.sae import SaeAudit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.intervene.sae import attach_sae
from faithful_train.objectives.caft import CaftObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer
from tests.unit.equality_cases import PlantedEquality
from tests.unit.sae_cases import _identity_sae, _Module


@pytest.mark.parametrize(
    "planted, expected",
    [
        ("identity", {"fvu": 0.0, "ce_recovered": 1.0, "kl_recovered": 1.0}),
        ("zero", {"ce_recovered": 0.0, "kl_recovered": 0.0}),
    ],
)
def test_the_audit_on_planted_saes(planted, expected):
    torch.manual_seed(0)
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    sae = _identity_sae(32)
    if planted == "zero":
        with torch.no_grad():
            sae.W_dec.zero_()  # reconstructs 0: the splice is the zero ablation
    sae.site, sae.target = "blocks.0.resid_post", None
    audit = SaeAudit(sae="sae", n_examples=64, batch_size=32)
    audit.bind(model, task)
    audit.attach(_Module(model, sae))
    figures = audit.evaluate(model, task)
    for name, value in expected.items():
        assert figures[name] == pytest.approx(value, abs=1e-5), name
    assert figures["ce_zero"] > figures["ce_clean"] or planted == "zero"
    assert figures["dead"] == (0.0 if planted == "identity" else figures["dead"])
    with pytest.raises(ConfigError, match="no sae objective labelled 'other'"):
        SaeAudit(sae="other").attach(_Module(model, sae))


class PlantedLatents(PlantedEquality):
    """Hierarchical equality by hand: site ``h`` holds ``[copy of left, left, right]`` at every
    position; the answer reads units 1 and 2 only, so the copy (unit 0) is aligned with left as
    well as unit 1 is, and changes nothing. Through an identity SAE (latent i = relu(h_i)):
    swapping the most aligned latent of left (the copy, index 0 first) moves nothing; swapping
    two moves left; right is carried by one latent."""

    def forward(self, ids, attention_mask=None, positions=None, narrow=True):
        w, x, y, z = ids.unbind(1)
        left, right = (w == x).float(), (y == z).float()
        h = self.hook_h(torch.stack([left, left, right], -1)[:, None].repeat(1, 4, 1))
        same = 1 - (h[:, -1, 1] - h[:, -1, 2]).abs()
        return self.answer(ids, same, positions)


def _planted():
    task = HierarchicalEquality()
    model, sae = PlantedLatents(task), _identity_sae(3)
    sae.site, sae.target = "h", None
    attach_sae(model, "h", sae, "test")
    return task, model, sae


def test_the_audit_finds_the_latents_that_carry_each_variable():
    task, model, sae = _planted()
    audit = SaeAudit(
        sae="sae",
        variables={"left": [3], "right": {"positions": [3]}},
        max_latents=2,
        ladder=True,
        n_examples=256,
        batch_size=128,
    )
    audit.bind(model, task)
    audit.attach(_Module(model, sae))
    figures = audit.evaluate(model, task)
    assert figures["auroc/left/0"] == figures["auroc/left/1"] == figures["auroc/left"] == 1.0
    assert figures["auroc/right"] == 1.0
    assert 0.35 < figures["latent_iia/left/top1"] < 0.65  # the copy: right only where the label stays
    assert figures["latent_iia/left/top2"] == figures["latent_iia/left"] == 1.0
    assert figures["latent_iia/right/top1"] == 1.0
    assert figures["latents_needed/left"] == 2 and figures["latents_needed/right"] == 1
    assert figures["fvu"] == pytest.approx(0.0, abs=1e-6)
    # more latents asked for than the SAE has: every latent (6), which also swaps right's
    wide = SaeAudit(sae="sae", variables={"left": [3]}, max_latents=10, n_examples=64)
    wide.bind(model, task)
    wide.attach(_Module(model, sae))
    assert 0.35 < wide.evaluate(model, task)["latent_iia/left"] < 0.65
    # a bar no count reaches: inf
    strict = SaeAudit(sae="sae", variables={"left": [3]}, max_latents=1, ladder=True, iia_bar=1.0, n_examples=64)
    strict.bind(model, task)
    strict.attach(_Module(model, sae))
    with torch.no_grad():
        sae.W_dec[1].zero_()  # left's real latent no longer decodes: no swap moves left
    assert math.isinf(strict.evaluate(model, task)["latents_needed/left"])


def test_the_audit_selects_latents_causally_with_select_iia():
    """The planted copy of left ranks first by AUROC and moves nothing; chosen by what swapping
    does, one latent (the real one) carries left."""
    task, model, sae = _planted()
    audit = SaeAudit(sae="sae", variables={"left": [3]}, max_latents=1, ladder=True, select="iia", n_examples=256)
    audit.bind(model, task)
    audit.attach(_Module(model, sae))
    figures = audit.evaluate(model, task)
    assert figures["latent_iia/left"] == figures["latent_iia/left/top1"] == 1.0
    assert figures["latents_needed/left"] == 1
    assert audit._chosen["left"][0] == 1  # the unit the answer reads
    with pytest.raises(UnknownNameError, match="select"):
        SaeAudit(sae="sae", select="probe")
    with pytest.raises(ConfigError, match="candidates"):
        SaeAudit(sae="sae", candidates=0)


def test_the_audit_checks_its_variables():
    task, model, sae = _planted()
    with pytest.raises(UnknownNameError, match="variable or concept"):
        SaeAudit(sae="sae", variables={"middle": [3]}).bind(model, task)
    with pytest.raises(ConfigError, match="unknown key 'site'"):
        SaeAudit(sae="sae", variables={"left": {"site": "h"}})
    other = _identity_sae(3)
    with pytest.raises(ConfigError, match="already holds another SAE"):
        attach_sae(model, "h", other, "audit 'x'")


def test_on_padded_text_with_multi_token_answers_swapping_every_latent_is_the_site_swap(tmp_path, monkeypatch):
    """Through an identity SAE (no error term), swapping all latents at a span is swapping the
    site there: latent IIA equals the interchange audit's IIA on the same padded, multi-token,
    explicit-pair text rows (teacher-forced counterfactual answers included)."""
    from faithful_train.audits.interchange import InterchangeAudit
    from faithful_train.functional.latents import latent_scores
    from faithful_train.functional.losses import answer_forward, answer_loss
    from faithful_train.intervene.sites import SiteRef
    from faithful_train.tasks.batch import answer_mask, answer_targets
    from faithful_train.tasks.text import TextTask
    from tests.unit.text_rows import color_rows, word_tokenizer, write_jsonl

    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    rows = color_rows()
    for row in rows:  # two-token answers "<colour> <colour>": the second follows the first, so teacher forcing matters
        row["answer"] = " ".join([row["answer"].split()[-1]] * len(row["answer"].split()))
        row["counterfactual_answer"]["thing"] = " ".join(
            [row["counterfactual_answer"]["thing"].split()[-1]] * len(row["counterfactual_answer"]["thing"].split())
        )
    task = TextTask(str(write_jsonl(tmp_path / "train.jsonl", rows)), str(word_tokenizer(tmp_path / "tok")))
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=16)
    rows = task.sample(16, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):  # learn the rows, so that answers (and swapped answers) are not all wrong
        optimizer.zero_grad()
        answer_loss(answer_forward(model, rows), answer_targets(rows), answer_mask(rows)).backward()
        optimizer.step()
    model.eval()
    sae = _identity_sae(32)
    sae.site, sae.target = "blocks.0.resid_pre", None  # the thing's token itself, before any attention
    attach_sae(model, "blocks.0.resid_pre", sae, "test")
    at = {"span": "thing", "token": "last"}
    audit = SaeAudit(
        sae="sae", variables={"thing": at, "kind": None}, max_latents=64, n_examples=16, batch_size=8, seed=5
    )
    audit.bind(model, task)
    audit.attach(_Module(model, sae))
    figures = audit.evaluate(model, task)
    reference = InterchangeAudit(
        {"thing": {"site": "blocks.0.resid_pre", "positions": at}}, controls=[], n_examples=16, batch_size=8, seed=5
    )
    reference.bind(model, task)
    assert figures["latent_iia/thing"] == pytest.approx(reference.evaluate(model, task)["iia/thing"], abs=1e-6)
    assert figures["latent_iia/thing"] > 0.2, figures["latent_iia/thing"]  # a figure that teacher forcing decides
    assert 0.5 <= figures["auroc/kind"] <= 1 and "latent_iia/kind" not in figures  # a concept: alignment only
    # select: iia on the same padded, multi-token rows: the greedy choice scores on its selection
    # set what the chosen latents then score there (same pairs, same teacher forcing)
    causal = SaeAudit(
        sae="sae",
        variables={"thing": at},
        max_latents=2,
        candidates=8,
        select="iia",
        n_examples=16,
        batch_size=8,
        seed=5,
    )
    causal.bind(model, task)
    causal.attach(_Module(model, sae))
    assert 0 <= causal.evaluate(model, task)["latent_iia/thing"] <= 1
    order = causal._chosen["thing"].tolist()
    assert sorted(order) == list(range(sae.n_latents))  # every latent once: the 2 chosen, then the ranking
    # every-position scores leave padding out
    batch = task.sample(4, 0)
    latents = torch.ones(*batch["input_ids"].shape, 3)
    latents[batch["attention_mask"] == 0] = 100.0
    assert batch["attention_mask"].min() == 0 and torch.equal(
        latent_scores(latents, SiteRef("x"), batch), torch.ones(4, 3)
    )
    # positions outside the prompt are one line, before anything runs
    with pytest.raises(ConfigError, match="position 40 is outside"):
        SaeAudit(sae="sae", variables={"thing": [40]}).bind(model, task)
    with pytest.raises(ConfigError, match="position 40 is outside"):
        CaftObjective(concept="thing", positions=[40]).bind(model, task)
