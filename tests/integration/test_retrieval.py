"""The retrieval and tools configs from the CLI: train, audit, write provenance records; the same
audits and objective on text files with documents and tool calls; bad input is one line."""

from __future__ import annotations

import json

import pytest

from faithful_train.commands.cli import main
from tests.integration.test_cli import assert_fit_fails_in_one_line
from tests.unit.evidence_rows import WORDS, document_rows, tool_rows
from tests.unit.text_rows import word_tokenizer, write_jsonl

TINY = [
    "trainer.max_steps=20",
    "trainer.val_every=10",
    "trainer.progress_bar=false",
    "audits.0.every_n_steps=10",
    "audits.0.n_examples=32",
    "data.val_size=32",
    "data.batch_size=16",
    "logger.wandb.mode=disabled",
]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


@pytest.mark.parametrize("config", ["configs/retrieval-cf.yaml", "configs/retrieval-baseline.yaml"])
def test_retrieval_configs_run_and_write_provenance(config, tmp_path):
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path), *TINY]) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for key in (
        "audit/retrieval/counterfactual_follow",
        "audit/retrieval/reliance_acc",
        "audit/retrieval/consulted_used_spearman",
    ):
        assert key in metrics, key
    assert ("train/objective/counterfactual_context" in metrics) == config.endswith("cf.yaml")
    records = (tmp_path / "provenance" / "step000020.jsonl").read_text().splitlines()
    assert len(records) == 32 * 4 and {"consulted", "used", "kind"} <= set(json.loads(records[0]))


def test_retrieval_needs_documents(tmp_path, capsys):
    assert_fit_fails_in_one_line(
        "configs/retrieval-baseline.yaml",
        tmp_path,
        capsys,
        ["task={name: hierarchical_equality}"],
        "needs a task with documents",
        "kv_retrieval",
    )


@pytest.mark.parametrize("config", ["configs/tools-cf.yaml", "configs/tools-baseline.yaml"])
def test_tools_configs_run(config, tmp_path):
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path), *TINY]) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for key in (
        "audit/tools/reliance",
        "audit/tools/selection_acc",
        "audit/tools/called_but_ignored",
        "train/objective/tool_call",
        "val/tool_selection_acc",
    ):
        assert key in metrics, key
    assert ("train/objective/counterfactual_context" in metrics) == config.endswith("cf.yaml")


def _text_task(tmp_path, rows, name):
    tok = word_tokenizer(tmp_path / "tok", WORDS)
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return ["task={name: text}", f"task.train={path}", f"task.tokenizer={tok}", "model=dense-tiny", "data.val_size=16"]


@pytest.mark.parametrize(
    "config, rows, audit",
    [
        ("configs/retrieval-cf.yaml", document_rows(48), "retrieval"),
        ("configs/tools-cf.yaml", tool_rows(48), "tools"),
    ],
)
def test_text_files_with_documents_and_tools(config, rows, audit, tmp_path, monkeypatch):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = _text_task(tmp_path, rows, audit)
    assert main(["fit", "-c", config, "--run-dir", str(run), *TINY, *args, "audits.0.n_examples=16"]) == 0
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    headline = "counterfactual_follow" if audit == "retrieval" else "reliance"
    assert f"audit/{audit}/{headline}" in metrics and "train/objective/counterfactual_context" in metrics


def test_text_without_documents_or_tool_token_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    for name in "abc":
        (tmp_path / name).mkdir()
    tools = _text_task(tmp_path, tool_rows(), "tools")
    assert_fit_fails_in_one_line(
        "configs/retrieval-baseline.yaml", tmp_path / "a", capsys, tools, "needs a 'documents' column", "tools.jsonl"
    )
    bad = tool_rows()
    bad[3]["tool_calls"][0]["tool"] = "wikipedia"
    args = _text_task(tmp_path, bad, "bad_tool")
    assert_fit_fails_in_one_line(
        "configs/tools-baseline.yaml",
        tmp_path / "b",
        capsys,
        args,
        "row 3 column 'tool_calls' item 0 'tool'",
        "'wikipedia' is not a token",
    )
    malformed = document_rows()
    malformed[5]["documents"] = "apple is red"
    args = _text_task(tmp_path, malformed, "bad_docs")
    assert_fit_fails_in_one_line(
        "configs/retrieval-baseline.yaml",
        tmp_path / "c",
        capsys,
        args,
        "row 5 column 'documents'",
        "a list of non-empty texts",
    )


SHORT = [
    "trainer.max_steps=400",
    "trainer.val_every=200",
    "trainer.progress_bar=false",
    "audits.0.every_n_steps=400",
    "audits.0.n_examples=256",
    "data.val_size=256",
    "logger.wandb.mode=disabled",
]


def _short_fit(config, run_dir, *extra):
    assert main(["fit", "-c", config, "--run-dir", str(run_dir), *SHORT, *extra]) == 0
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, figure, trained_at_least, baseline_at_most",
    [("retrieval", "audit/retrieval/counterfactual_follow", 0.3, 0.05), ("tools", "audit/tools/reliance", 0.6, 0.4)],
)
def test_counterfactual_context_makes_answers_follow_the_evidence(
    kind, figure, trained_at_least, baseline_at_most, tmp_path
):
    """The objective's effect, 400 steps each: with it the answer follows counterfactual
    evidence (a document or a tool result); without it the model answers from memory."""
    extra = ["audits.0.surrogate_ablations=0"] if kind == "retrieval" else []
    trained = _short_fit(f"configs/{kind}-cf.yaml", tmp_path / "cf", *extra)
    baseline = _short_fit(f"configs/{kind}-baseline.yaml", tmp_path / "baseline", *extra)
    assert trained[figure] >= trained_at_least and baseline[figure] <= baseline_at_most, (
        trained[figure],
        baseline[figure],
    )
