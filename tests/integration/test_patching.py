"""configs/patching.yaml from the command line, made short: it trains, logs the patching audit's
figures and writes the cell table and the heatmap at every audit; ``audit`` on its checkpoint
writes them again; a bad value is one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from faithful_train.commands.cli import main
from faithful_train.io.files import read_jsonl
from tests.integration.test_cli import TINY, assert_fit_fails_in_one_line

CONFIG = "configs/patching.yaml"


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def test_config_runs_and_writes_the_heatmap(tmp_path):
    assert Path(CONFIG).read_text().splitlines()[0] == f"# faithful-train fit -c {CONFIG}"
    run = tmp_path / "fit"
    assert main(["fit", "-c", CONFIG, "--run-dir", str(run), *TINY]) == 0
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    for key in (
        "clean",
        "corrupted",
        "max/heads/layer0",
        "max/mlp.out/layer1",
        "max/resid_pre/layer1",
        "max/attn.out/layer0",
        "atp/spearman",
        "atp/missed",
        "atp/spearman_all",
        "circuit/cpr",
        "circuit/cmd",
    ):
        assert f"audit/patching/{key}" in metrics, key
    assert [r["step"] for r in read_jsonl(run / "audits.jsonl")] == [10, 20, 30]
    for step in (10, 20, 30):
        assert (run / "patching" / f"step{step:06d}.png").read_bytes()[:4] == b"\x89PNG"
    with open(run / "patching" / "step000030.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 * 3 + 2 * 4 * 4 and {r["component"] for r in rows} == {
        "resid_pre",
        "attn.out",
        "mlp.out",
        "heads",
    }

    again = tmp_path / "audit"
    assert (
        main(["audit", "-c", CONFIG, "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--run-dir", str(again), *TINY])
        == 0
    )
    assert (again / "patching" / "step000030.png").is_file() and (again / "patching" / "step000030.csv").is_file()


@pytest.mark.parametrize(
    "overrides, message, valid",
    [
        (["audits.0.components=[resid_post]"], "unknown patching component 'resid_post'", "resid_pre"),
        (["audits.0.positions=[7]"], "position 7 is outside the task's sequence length 4", "audits.0"),
        (["audits.0.metric=acc"], "metric 'acc' has no gradient for atp", "logit_diff"),
        (["audits.0.corrupt=[middle]"], "unknown variable of task 'hierarchical_equality' 'middle'", "left, right"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, overrides, message, valid):
    assert_fit_fails_in_one_line(CONFIG, tmp_path, capsys, overrides, message, valid)
