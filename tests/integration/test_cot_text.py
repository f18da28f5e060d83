"""Chain of thought on text from the CLI: the arithmetic set written by ``data arithmetic``, the
counterfactual-CoT config and its baseline, the cot audit's figures on text, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faithful_train.commands.cli import main
from faithful_train.tasks.arithmetic_text import write_arithmetic
from tests.integration.test_text import TINY as TEXT_TINY

TINY = [*TEXT_TINY, "audits.0.n_examples=32", "audits.0.every_n_steps=4"]


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("arithmetic")
    write_arithmetic(out, seed=0, n_train=128, n_val=32, n_audit=32)
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, repo):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(repo)


def files(out: Path) -> list[str]:
    return [f"task.{split}={out}/{split}.jsonl" for split in ("train", "val", "audit")] + [
        f"task.tokenizer={out}/tokenizer"
    ]


@pytest.mark.parametrize("config", ["configs/cot-text.yaml", "configs/cot-text-baseline.yaml"])
def test_the_cot_text_configs_run_and_audit_on_text(arithmetic, tmp_path, config):
    run = tmp_path / "run"
    assert main(["fit", "-c", config, "--run-dir", str(run), *TINY, *files(arithmetic)]) == 0
    records = [json.loads(line) for line in (run / "audits.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    for key in ("clean_acc", "follow_rate", "original_rate", "early_aoc", "early/0", "filler_acc", "follow_rate/step1"):
        assert key in records[-1]["metrics"], key
    for key in ("gen_acc", "decoding_agreement", "gen_early_aoc", "gen_filler_acc", "gen_early/0.5"):
        assert key in records[-1]["metrics"], key
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert 0.0 <= summary["val/gen_acc"] <= 1.0  # the answer after a rationale it wrote itself
    assert ("train/objective/counterfactual_cot" in summary) == ("baseline" not in config)


def test_counterfactual_cot_without_counterfactual_rationales_is_one_line(arithmetic, tmp_path, capsys):
    rows = [json.loads(line) for line in (arithmetic / "train.jsonl").read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "steps", "answer")}) + "\n" for r in rows))
    overrides = [*TINY, *files(arithmetic), f"task.train={bare}", f"task.val={bare}", f"task.audit={bare}"]
    code = main(["fit", "-c", "configs/cot-text.yaml", "--run-dir", str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no counterfactual rationales" in err, err


def test_a_negative_temperature_is_one_line(arithmetic, tmp_path, capsys):
    overrides = [*TINY, *files(arithmetic), "audits.0.decoding=[{temperature: 0}, {temperature: -1}]"]
    code = main(["fit", "-c", "configs/cot-text.yaml", "--run-dir", str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "decoding.1: sampling temperature -1 < 0" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_objective_trains_on_rationales_a_label_fn_writes(arithmetic, tmp_path):
    rows = [json.loads(line) for line in (arithmetic / "train.jsonl").read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(
        "".join(json.dumps({k: r[k] for k in ("prompt", "steps", "conclusion", "answer")}) + "\n" for r in rows)
    )
    run = tmp_path / "run"
    overrides = [*TINY, *files(arithmetic), f"task.train={bare}", f"task.val={bare}", f"task.audit={bare}"]
    overrides.append("task.label_fn=faithful_train.tasks.arithmetic_text:continue_chain")
    assert main(["fit", "-c", "configs/cot-text.yaml", "--run-dir", str(run), *overrides]) == 0
    summary = json.loads((run / "summary.json").read_text())["metrics"]
    assert "train/objective/counterfactual_cot" in summary and "audit/cot/follow_rate" in summary
