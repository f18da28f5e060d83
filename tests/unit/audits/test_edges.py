"""The edges audit on a planted model whose answer flows through three known edges: exact
patching, EAP, CPR and CMD equal their hand-computed values; the declared circuit is faithful;
the files (graph JSON in EAP-IG's format, PNG, hypothesis) are written and read back."""

import json
import math

import pytest
import torch

from faithful_train.audits.edges import EdgesAudit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.functional.circuits import answer_metric
from faithful_train.functional.edges import circuit_logits, edge_scores, knockouts, record
from faithful_train.intervene.edges import model_graph
from faithful_train.intervene.hypotheses import Hypothesis
from tests.unit.planted_edges import EDGES, PlantedEdgesModel, PlantedEdgesTask


def _pair():
    task = PlantedEdgesTask()
    clean = task.sample(8, 0)
    bad = dict(clean, input_ids=clean["input_ids"].roll(1, 0))
    return task, clean, bad


def test_planted_exact_patching_and_eap_by_hand():
    task, clean, bad = _pair()
    model = PlantedEdgesModel()
    graph = model_graph(model)
    x, x_bad = clean["input_ids"][:, -1].float(), bad["input_ids"][:, -1].float()
    with torch.no_grad():
        corrupt = record(model, bad)[1].wide(model.graph_parts())
        logits = circuit_logits(model, clean, knockouts(graph, graph.edges), corrupt)
    metric = answer_metric("logit_diff", logits, clean["labels"], None, task.answer_tokens)
    planted = {graph.parse_edge(e) for e in EDGES}
    for (s, r), values in zip(graph.edges, metric):
        expected = 6 * x_bad if (s, r) in planted else 6 * x
        torch.testing.assert_close(values, expected, atol=1e-5, rtol=0, msg=graph.edge_name(s, r))
    scores = edge_scores(
        model, clean, lambda lg: answer_metric("logit_diff", lg, clean["labels"], None, (0, 1)), "eap", corrupted=bad
    )
    exact = (metric - 6 * x).sum(1)
    torch.testing.assert_close(torch.stack([scores[s, r] for s, r in graph.edges]).float(), exact, atol=1e-4, rtol=0)


def test_planted_audit_cpr_cmd_by_hand(tmp_path):
    """46 edges; the three planted ones tie at the top, the rest score 0. At MIB's fractions
    0.1%..2% the circuit is one edge (pruned to nothing: f = 0), from 5% (3 edges) it is the
    planted path (f = 1). CPR = 0.03 * 1/2 + 0.95 = 0.965; CMD = 0.019 + 0.03 * 1/2 = 0.034."""
    task = PlantedEdgesTask()
    model = PlantedEdgesModel()
    audit = EdgesAudit(n_examples=64, method="eap", circuit=EDGES, verify_top=3, top=3)
    audit.bind(model, task, 0)
    figures = audit.evaluate(model, task)
    for prefix in ("", "exact/"):
        assert math.isclose(figures[f"{prefix}cpr"], 0.965, abs_tol=1e-9)
        assert math.isclose(figures[f"{prefix}cmd"], 0.034, abs_tol=1e-9)
        assert figures[f"{prefix}fraction_at_0.8"] == 0.05
    assert figures["faithfulness_at/0.02"] == 0 and figures["faithfulness_at/0.05"] == 1
    assert math.isclose(figures["circuit/faithfulness"], 1.0, abs_tol=1e-9) and figures["circuit/n_edges"] == 3
    assert figures["verify/sign_agreement"] == 1.0
    assert {row["edge"] for row in audit.top_edges()} == set(EDGES)
    audit.remember(figures, 5)
    audit.write_artifacts(model, task, tmp_path, 5, [])
    graph = json.loads((tmp_path / "edges" / "graph_step000005.json").read_text())
    assert {e for e, v in graph["edges"].items() if v["in_graph"]} == set(EDGES)
    assert len(graph["edges"]) == 46 and graph["cfg"]["n_heads"] == 2 and graph["nodes"]["a0.h0"]["in_graph"]
    assert (tmp_path / "edges" / "circuit_step000005.png").stat().st_size > 1000
    found = Hypothesis.load(tmp_path / "hypotheses" / "edges.json", kind="circuit")
    assert set(found.edges) == set(EDGES) and found.method == "eap" and found.figures["cpr"] == figures["cpr"]
    again = EdgesAudit(n_examples=64, method="eap", hypothesis=str(tmp_path / "hypotheses" / "edges.json"))
    again.bind(model, task, 0)
    assert again.evaluate(model, task)["circuit/faithfulness"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"method": "acdc"}, "edge attribution method"),
        ({"ablation": "mean"}, "eap-ig-inputs interpolates"),
        ({"metric": "acc"}, "no gradient"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"fractions": [0.5, 0.1]}, "fractions must rise"),
        ({"circuit": EDGES, "hypothesis": "x.json"}, "not both"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, words):
    with pytest.raises((ConfigError, UnknownNameError), match=words):
        EdgesAudit(**kwargs)


def test_bad_edges_are_named_at_bind():
    audit = EdgesAudit(circuit=["a0.h0->m1<q>"])
    with pytest.raises(ConfigError, match=r"audit 'edges': circuit.0: .*only attention heads have q/k/v"):
        audit.bind(PlantedEdgesModel(), PlantedEdgesTask(), 0)
