"""Latent–variable alignment (``faithful_train.latents``), the ``sae`` audit's AUROC and latent
IIA on a planted model whose latents are known, and the ``caft`` objective's ablation."""

from __future__ import annotations

import math

import pytest
import torch

from faithful_train.audits.sae import SaeAudit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.latents import alignment_ranking, greedy_selection, one_hot_basis, value_aurocs
from faithful_train.objectives.caft import CaftObjective
from faithful_train.sae import SparseAutoencoder, attach_sae
from faithful_train.sites import run_with
from faithful_train.tasks.decoy_objects import DecoyObjects
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer
from tests.unit.test_interchange import PlantedEquality
from tests.unit.test_sae import _identity_sae, _Module


def test_value_aurocs_and_ranking():
    values = torch.tensor([0, 0, 1, 1, 2, 2])
    scores = torch.tensor(
        [[1.0, 0.0, 0.3], [1.0, 0.0, 0.1], [0.0, 2.0, 0.2], [0.0, 2.0, 0.3], [0.0, 0.0, 0.1], [0.0, 0.0, 0.2]]
    )  # latent 0 fires for value 0, latent 1 for value 1, latent 2 is noise
    aurocs = value_aurocs(scores, values)
    assert set(aurocs) == {0, 1, 2}
    assert aurocs[0][0] == 1.0 and aurocs[1][1] == 1.0
    assert aurocs[2][0] == pytest.approx(0.25)  # ties count half: silent for 2, and for 1 too
    order, strength = alignment_ranking(aurocs)
    assert order[:2].tolist() == [0, 1] and strength[0] == 0.5 and strength[-1] < 0.5
    # a one-hot basis swaps exactly the chosen latents
    from faithful_train.interventions import interchange

    base, source = torch.zeros(2, 5), torch.arange(10.0).view(2, 5)
    swapped = interchange(base, source, torch.ones(1, 5, dtype=torch.bool), one_hot_basis(torch.tensor([3, 1]), 5))
    assert torch.equal(swapped, torch.tensor([[0.0, 1, 0, 3, 0], [0, 6, 0, 8, 0]]))


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


def test_greedy_selection_picks_by_what_the_swap_does():
    ranked = torch.tensor([4, 0, 1, 2, 3])
    carriers = {1: 0.5, 3: 0.4}  # latents 1 and 3 carry the variable (their IIAs add); the rest do nothing

    def accuracy(sets):
        return torch.tensor([sum(carriers.get(int(i), 0.0) for i in s) for s in sets])

    order, scores = greedy_selection(ranked, 2, accuracy)
    assert order.tolist() == [1, 3, 4, 0, 2] and scores.tolist() == pytest.approx([0.5, 0.9])
    narrow, _ = greedy_selection(ranked, 2, accuracy, candidates=3)  # 3 is not among the 3 first ranked
    assert narrow.tolist() == [1, 4, 0, 2, 3]  # the tie after 1 (all 0.5) goes to the earlier-ranked


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


def test_caft_ablates_the_concepts_latents_in_the_steps_forward_only():
    torch.manual_seed(0)
    task = DecoyObjects()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    width = 32
    sae = SparseAutoencoder(width, 64, k=8)
    sae.site, sae.target = "blocks.0.resid_post", None
    attach_sae(model, "blocks.0.resid_post", sae, "test")
    objective = CaftObjective(concept="decoy", positions=[-2], min_auroc=0.6, probe_examples=256, ablation="latents")
    objective.bind(model, task)
    objective.attach(_Module(model, sae))
    batch = task.sample(16, 5)
    edits = objective.step_edits(model, task, 0, batch)
    chosen = objective.ablated
    assert len(chosen) >= 1 and objective.strength >= 0.6
    ids = batch["input_ids"]
    _, clean = run_with(model, ids, record=["blocks.0.resid_post", "blocks.0.resid_post.sae"])
    logits, edited = run_with(model, ids, record=["blocks.1.resid_pre"], edits=edits)
    z = clean["blocks.0.resid_post.sae"][..., chosen]
    expected = clean["blocks.0.resid_post"].clone()
    expected[:, -2] -= z[:, -2] @ sae.W_dec[chosen]  # at the tag's position only, where they were read
    torch.testing.assert_close(edited["blocks.1.resid_pre"], expected, atol=1e-5, rtol=1e-5)
    logits.sum().backward()  # the task loss reaches the model, never the SAE
    assert all(p.grad is None for p in sae.parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None if hasattr(model.blocks[0].attn, "qkv") else True
    assert objective.step_edits(model, task, 1, batch) and objective.ablated is chosen  # chosen once (refresh_every 0)
    # the paper's projection: nothing left along the chosen decoder directions, there only
    projection = CaftObjective(concept="decoy", positions=[-2], min_auroc=0.6, probe_examples=256)
    projection.bind(model, task)
    projection.attach(_Module(model, sae))
    _, projected = run_with(model, ids, record=["blocks.1.resid_pre"], edits=projection.step_edits(model, task, 0, batch))
    directions = sae.W_dec.detach()[projection.ablated]
    torch.testing.assert_close(projected["blocks.1.resid_pre"][:, -2] @ directions.T, torch.zeros(16, len(directions)), atol=1e-4, rtol=0)
    torch.testing.assert_close(projected["blocks.1.resid_pre"][:, :-2], clean["blocks.0.resid_post"][:, :-2])
    state = objective.state_dict()
    again = CaftObjective(concept="decoy")
    again.load_state_dict(state)
    assert torch.equal(again.ablated, chosen)
    with pytest.raises(UnknownNameError, match="variable or concept"):
        CaftObjective(concept="tag").bind(model, task)
    with pytest.raises(UnknownNameError, match="projection"):
        CaftObjective(concept="decoy", ablation="zero")


def test_on_padded_text_with_multi_token_answers_swapping_every_latent_is_the_site_swap(tmp_path, monkeypatch):
    """Through an identity SAE (no error term), swapping all latents at a span is swapping the
    site there: latent IIA equals the interchange audit's IIA on the same padded, multi-token,
    explicit-pair text rows (teacher-forced counterfactual answers included)."""
    from faithful_train.audits.interchange import InterchangeAudit
    from faithful_train.batches import answer_forward, answer_loss, answer_mask, answer_targets
    from faithful_train.latents import latent_scores
    from faithful_train.sites import SiteRef
    from faithful_train.tasks.text import TextTask
    from tests.unit.test_text_task import color_rows, word_tokenizer, write_jsonl

    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    rows = color_rows()
    for row in rows:  # two-token answers "<colour> <colour>": the second follows the first, so teacher forcing matters
        row["answer"] = " ".join([row["answer"].split()[-1]] * len(row["answer"].split()))
        row["counterfactual_answer"]["thing"] = " ".join([row["counterfactual_answer"]["thing"].split()[-1]] * len(row["counterfactual_answer"]["thing"].split()))
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
    audit = SaeAudit(sae="sae", variables={"thing": at, "kind": None}, max_latents=64, n_examples=16, batch_size=8, seed=5)
    audit.bind(model, task)
    audit.attach(_Module(model, sae))
    figures = audit.evaluate(model, task)
    reference = InterchangeAudit({"thing": {"site": "blocks.0.resid_pre", "positions": at}}, controls=[], n_examples=16, batch_size=8, seed=5)
    reference.bind(model, task)
    assert figures["latent_iia/thing"] == pytest.approx(reference.evaluate(model, task)["iia/thing"], abs=1e-6)
    assert figures["latent_iia/thing"] > 0.2, figures["latent_iia/thing"]  # a figure that teacher forcing decides
    assert 0.5 <= figures["auroc/kind"] <= 1 and "latent_iia/kind" not in figures  # a concept: alignment only
    # select: iia on the same padded, multi-token rows: the greedy choice scores on its selection
    # set what the chosen latents then score there (same pairs, same teacher forcing)
    causal = SaeAudit(sae="sae", variables={"thing": at}, max_latents=2, candidates=8, select="iia", n_examples=16, batch_size=8, seed=5)
    causal.bind(model, task)
    causal.attach(_Module(model, sae))
    assert 0 <= causal.evaluate(model, task)["latent_iia/thing"] <= 1
    order = causal._chosen["thing"].tolist()
    assert sorted(order) == list(range(sae.n_latents))  # every latent once: the 2 chosen, then the ranking
    # every-position scores leave padding out
    batch = task.sample(4, 0)
    latents = torch.ones(*batch["input_ids"].shape, 3)
    latents[batch["attention_mask"] == 0] = 100.0
    assert batch["attention_mask"].min() == 0 and torch.equal(latent_scores(latents, SiteRef("x"), batch), torch.ones(4, 3))
    # positions outside the prompt are one line, before anything runs
    with pytest.raises(ConfigError, match="position 40 is outside"):
        SaeAudit(sae="sae", variables={"thing": [40]}).bind(model, task)
    with pytest.raises(ConfigError, match="position 40 is outside"):
        CaftObjective(concept="thing", positions=[40]).bind(model, task)
