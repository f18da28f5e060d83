"""The ablation audit: exact necessity, sufficiency and MIB measures on a planted circuit; every
knockout batched equals its own forward; hypotheses written and read back; clear errors."""

import json

import pytest
import torch

from faithful_train.audits.ablation import AblationAudit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.circuits import AblationValues, Knockout, answer_metric, components, knockout_logits
from faithful_train.intervene.hypotheses import Hypothesis
from faithful_train.intervene.sites import SiteRef, run_with
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer
from tests.unit.planted_circuit import CIRCUIT, PlantedCircuit


def _audit(circuit=CIRCUIT, **kwargs):
    task = HierarchicalEquality()
    model = PlantedCircuit(task)
    options = dict(circuit=circuit, ablation="zero", n_examples=64, batch_size=32, bootstrap=200)
    audit = AblationAudit(**(options | kwargs))
    audit.bind(model, task)
    return audit, model, task


def test_planted_circuit_is_exactly_necessary_and_sufficient():
    audit, model, task = _audit()
    figures = audit.evaluate(model, task)
    assert figures["full"] == pytest.approx(10.0)
    assert figures["empty"] == pytest.approx(0.0)
    assert figures["sufficiency"] == pytest.approx(10.0)  # the circuit alone does everything
    assert figures["necessity"] == pytest.approx(0.0)  # without it, nothing is left
    assert figures["faithfulness"] == pytest.approx(1.0)
    assert figures["necessity_normalised"] == pytest.approx(1.0)
    assert figures["faithfulness_low"] == pytest.approx(1.0) and figures["faithfulness_high"] == pytest.approx(1.0)
    assert figures["completeness"] == pytest.approx(0.0)  # any subset removed kills both
    for node in ("blocks.0.attn.heads.h0+1", "blocks.1.mlp.out"):
        assert figures[f"minimality/{node}"] == pytest.approx(10.0)
    assert figures["effect/blocks.0.attn.heads.h0"] == pytest.approx(10.0)
    assert figures["effect/blocks.1.mlp.out"] == pytest.approx(10.0)
    assert figures["effect/blocks.0.mlp.out"] == pytest.approx(0.0)
    assert figures["effect/blocks.1.attn.heads.h1"] == pytest.approx(0.0)
    # circuits of the top k of 6 nodes: f = 0, 0, 0, 1, 1, 1, 1 (the three planted nodes first)
    assert figures["cpr"] == pytest.approx(3.5 / 6)
    assert figures["cmd"] == pytest.approx(2.5 / 6)
    assert figures["task_acc"] == 1.0
    assert set(figures) <= set(audit.metric_names(task))


def test_half_the_circuit_is_neither_sufficient_nor_with_a_narrow_confidence_interval():
    audit, model, task = _audit(circuit=[{"site": "blocks.0.attn.heads", "heads": [0]}], ablation="resample")
    figures = audit.evaluate(model, task)
    assert figures["faithfulness"] < 0.5
    assert figures["faithfulness_low"] <= figures["faithfulness"] <= figures["faithfulness_high"]
    # resampling `left` from another example keeps the answer right half the time: necessity drops
    assert figures["necessity"] < figures["full"]


@pytest.mark.parametrize("ablation", ["zero", "mean", "mean_per_position", "resample"])
def test_batched_knockouts_equal_one_forward_each(ablation):
    torch.manual_seed(0)
    model = tiny_transformer()
    ids = torch.randint(0, 20, (5, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in one row
    batch = {"input_ids": ids, "attention_mask": mask}
    universe = components(model)
    sites = sorted({r.name for r in universe})
    _, clean = run_with(model, ids, record=sites, attention_mask=mask)
    values = AblationValues.from_reference(ablation, clean, mask)
    circuit = (
        SiteRef("blocks.0.attn.heads", heads=(1,), positions=(1, 2)),
        SiteRef.parse({"site": "blocks.1.mlp.out", "positions": "answer"}),
    )
    knockouts = [Knockout(), Knockout(tuple(universe)), Knockout(tuple(universe), circuit), Knockout(circuit)]
    together = knockout_logits(model, batch, knockouts, values, clean)
    for v, knockout in enumerate(knockouts):
        alone = knockout_logits(model, batch, [knockout], values, clean)[0]
        torch.testing.assert_close(together[v], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_metrics():
    logits = torch.tensor([[[0.0, 1.0, 3.0], [2.0, 0.0, 0.5]]])  # (1 variant, 2 examples, 3 tokens)
    labels = torch.tensor([2, 1])
    assert answer_metric("logit_diff", logits, labels).tolist() == [[2.0, -2.0]]
    assert answer_metric("logit_diff", logits, labels, answer_tokens=[1, 2]).tolist() == [[2.0, -0.5]]
    assert answer_metric("acc", logits, labels, answer_tokens=[1, 2]).tolist() == [[1.0, 0.0]]
    assert answer_metric("kl", logits, labels, clean_logits=logits[0]).abs().max() < 1e-6


def test_each_run_writes_a_hypothesis_that_reads_back(tmp_path):
    audit, model, task = _audit()
    audit.latest = audit.evaluate(model, task)
    audit.write_artifacts(model, task, tmp_path, 7, [])
    path = tmp_path / "hypotheses" / "ablation.json"
    record = json.loads(path.read_text())
    assert record["kind"] == "circuit" and record["step"] == 7 and record["ablation"] == "zero"
    assert record["figures"]["faithfulness"] == pytest.approx(1.0)
    again = AblationAudit(hypothesis=str(path), n_examples=64, batch_size=32, bootstrap=0)
    assert again.nodes == audit.nodes and again.ablation == "zero" and again.metric == "logit_diff"
    again.bind(model, task)
    assert again.evaluate(model, task)["faithfulness"] == pytest.approx(1.0)
    assert Hypothesis.load(path).weights_hash == record["weights_hash"]
    # the circuit and every node's effect in EAP-IG / MIB graph JSON
    graph = json.loads((tmp_path / "ablation" / "graph_step000007.json").read_text())
    assert {k for k, v in graph["nodes"].items() if v["in_graph"]} == {"input", "a0.h0", "a0.h1", "m1", "logits"}
    assert graph["nodes"]["a0.h0"]["score"] == pytest.approx(10.0) and graph["nodes"]["a1.h0"]["score"] == 0.0
    assert graph["edges"]["a0.h1->m1"]["in_graph"] and not graph["edges"]["a0.h1->m0"]["in_graph"]
    assert "input->a1.h1<v>" in graph["edges"] and "m1->logits" in graph["edges"]
    assert (tmp_path / "ablation" / "curve_step000007.csv").read_text().startswith("size,fraction,faithfulness\n0,")


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="either 'circuit'"):
        AblationAudit()
    with pytest.raises(UnknownNameError, match="ablation"):
        AblationAudit(circuit=CIRCUIT, ablation="shuffle")
    with pytest.raises(UnknownNameError, match="metric"):
        AblationAudit(circuit=CIRCUIT, metric="loss")
    with pytest.raises(ConfigError, match="does not exist"):
        AblationAudit(hypothesis=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not JSON"):
        AblationAudit(hypothesis=str(tmp_path / "bad.json"))
    audit = AblationAudit(circuit=["blocks.7.mlp.out"])
    with pytest.raises(UnknownNameError, match="blocks.7.mlp.out"):
        audit.bind(tiny_transformer(), HierarchicalEquality())
