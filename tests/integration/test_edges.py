"""Edge circuits from the CLI: the edges config audits over training and writes its graph files;
the edge-circuit objective trains and writes its circuit; ``verify`` re-tests the audit's edge
circuit on a checkpoint; bad edges are one line and exit 2."""

from __future__ import annotations

import json

import pytest

from faithful_train.commands.cli import main
from tests.integration.tiny import TINY as TINY_RUN
from tests.integration.tiny import fit_configs

TINY = [*TINY_RUN, "trainer.progress_bar=false", "logger.wandb.mode=disabled"]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return fit_configs(tmp_path_factory.mktemp("edges"), ["edges", "circuit-edges"], TINY)


def test_the_edges_config_logs_cpr_cmd_over_training_and_writes_graphs(runs):
    run = runs / "edges"
    records = [json.loads(line) for line in (run / "audits.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20]
    for r in records:
        for key in ("cpr", "cmd", "exact/cpr", "exact/cmd", "fraction_at_0.8", "verify/spearman"):
            assert key in r["metrics"], key
        assert len(r["top_edges"]) == 10 and "->" in r["top_edges"][0]["edge"]
    for step in (10, 20):
        graph = json.loads((run / "edges" / f"graph_step{step:06d}.json").read_text())
        assert len(graph["edges"]) == 110 and graph["cfg"]["scores"] == "eap-ig-inputs"
        assert any(e["in_graph"] for e in graph["edges"].values())
        assert (run / "edges" / f"circuit_step{step:06d}.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert "audit/edges/cpr" in summary and "audit/edges/cmd" in summary


def test_the_edge_circuit_objective_trains_and_verify_retests_its_circuit(runs, capsys):
    run = runs / "circuit-edges"
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert "train/objective/circuit/sufficiency" in summary and "audit/edges/circuit/faithfulness" in summary
    objective = json.loads((run / "hypotheses" / "circuit.json").read_text())
    assert len(objective["edges"]) == 20 and objective["nodes"] == []
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert main(["verify", str(run / "hypotheses" / "edges.json"), "--ckpt", ckpt]) == 0
    out = capsys.readouterr().out
    assert "the same weights and the same audit set" in out
    row = next(line for line in out.splitlines() if line.startswith("cpr "))
    assert row.split()[-1] in ("+0.0000", "-0.0000")


@pytest.mark.parametrize(
    "override, words",
    [
        (
            "objectives.0.edges.0=a0.h9->m1",
            "edges.0: node 'a0.h9' is not in the model's graph (a sender: input, a0.h0 .. a1.h3, m0 .. m1)",
        ),
        ("objectives.0.edges.0=input->m1<v>", "only attention heads have q/k/v inputs"),
        ("objectives.0.edges=[]", "at least one edge"),
        ("audits.0.circuit.3=m1->m0", "is not an edge"),
    ],
)
def test_bad_edges_are_one_line_and_exit_2(tmp_path, capsys, override, words):
    code = main(["fit", "-c", "configs/circuit-edges.yaml", "--run-dir", str(tmp_path / "run"), *TINY, override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_audit_follows_the_objectives_edge_circuit_live(tmp_path):
    """``hypothesis: hypotheses/circuit.json`` names the objective's own file: the audit tests the
    circuit the objective trains (read from it at each run), with no file needed beforehand."""
    run = tmp_path / "run"
    overrides = [*TINY, "audits.0.circuit=null", "audits.0.hypothesis=hypotheses/circuit.json"]
    assert main(["fit", "-c", "configs/circuit-edges.yaml", "--run-dir", str(run), *overrides]) == 0
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert summary["audit/edges/circuit/n_edges"] == 20
