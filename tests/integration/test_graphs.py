"""Attribution graphs from the CLI: the graphs config trains transcoders on every layer beside the
model, the sae audit reports them per layer, the graphs audit logs its scores over training and
writes Neuronpedia JSON and PNG per prompt; ``faithful-train graph`` builds one graph on demand;
bad input is one line and exit 2."""

from __future__ import annotations

import json
import shutil

import pytest

from faithful_train.commands.cli import main
from tests.integration.tiny import TINY as TINY_RUN
from tests.integration.tiny import fit_configs

TINY = [
    *TINY_RUN,
    "audits.1.every_n_steps=10",
    "audits.1.n_examples=2",
    "trainer.progress_bar=false",
    "logger.wandb.mode=disabled",
]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return fit_configs(tmp_path_factory.mktemp("graphs"), ["graphs"], TINY)


def test_the_graphs_config_logs_scores_and_writes_graph_files(runs):
    run = runs / "graphs"
    records = [json.loads(line) for line in (run / "audits.jsonl").read_text().splitlines()]
    graphs = [r for r in records if r["audit"] == "graphs"]
    saes = [r for r in records if r["audit"] == "sae"]
    assert [r["step"] for r in graphs] == [10, 20] and [r["step"] for r in saes] == [10, 20]
    for r in graphs:
        for key in (
            "replacement_score",
            "completeness",
            "nodes_at_0.8",
            "intervention_agreement",
            "intervention_agreement_frozen_attention",
            "trusted",
        ):
            assert key in r["metrics"], key
        assert 0 < r["metrics"]["replacement_score"] <= 1 and 0 < r["metrics"]["completeness"] <= 1
    for key in ("fvu/layer0", "fvu/layer1", "l0/layer1", "dead/layer0", "ce_recovered/layer1", "ce_recovered"):
        assert key in saes[-1]["metrics"], key
    for layer in (0, 1):
        cfg = json.loads((run / "saes" / "transcoders" / f"layer{layer}" / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.mlp.in"
    for step in (10, 20):
        for j in range(2):
            data = json.loads((run / "graphs" / "graphs" / f"step{step:06d}_prompt{j}.json").read_text())
            assert {"metadata", "qParams", "nodes", "links"} == set(data)
            assert any(n["feature_type"] == "logit" and n["is_target_logit"] for n in data["nodes"])
            assert (run / "graphs" / "graphs" / f"step{step:06d}_prompt{j}.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert "audit/graphs/replacement_score" in summary and "audit/graphs/intervention_agreement" in summary


def test_the_graph_command_builds_one_graph(runs, tmp_path, capsys):
    run = runs / "graphs"
    tokens = json.loads((run / "graphs" / "graphs" / "step000020_prompt0.json").read_text())["metadata"][
        "prompt_tokens"
    ]
    assert main(["graph", str(run), "--prompt", " ".join(tokens), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "replacement_score" in out and "intervention_agreement" in out
    files = sorted(p.suffix for p in (tmp_path / "out").iterdir())
    assert files == [".json", ".png"]
    data = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert data["metadata"]["prompt_tokens"] == tokens


def _one_line_exit_2(capsys, argv, words):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err, err


def test_bad_graph_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    run = runs / "graphs"
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("saes"))
    _one_line_exit_2(capsys, ["graph", str(bare), "--prompt", "1 2"], "has no transcoders")
    _one_line_exit_2(capsys, ["graph", str(run), "--prompt", " ".join(["1"] * 100)], "the model's context is")
    from faithful_train.intervene.sae import SparseAutoencoder
    from faithful_train.intervene.transcoders import Transcoders, save_transcoders

    narrow = Transcoders({i: SparseAutoencoder(32, 64, k=4, d_out=32) for i in range(2)})
    save_transcoders(narrow, tmp_path / "narrow")
    _one_line_exit_2(
        capsys,
        ["graph", str(run), "--prompt", "1 2", "--transcoders", str(tmp_path / "narrow")],
        "reads 32 dimensions, the site has 64",
    )


def test_a_graphs_audit_without_transcoders_is_one_line(tmp_path, capsys):
    config = tmp_path / "bare.yaml"
    config.write_text(
        "model: dense-tiny\ntask: {name: hierarchical_equality}\n"
        "audits:\n  - {name: graphs, transcoders: transcoders}\n"
    )
    argv = ["fit", "-c", str(config), "--run-dir", str(tmp_path / "run"), *TINY_RUN[:2]]
    _one_line_exit_2(capsys, argv, "no sae objective with layers labelled 'transcoders'")
    assert not (tmp_path / "run" / "checkpoints").exists()
