"""``faithful-train repro`` end to end on tiny runs: the table, the paired differences and the plot;
each seed row is the run ``fit`` gives with that seed; ``--strict``; a second invocation continues
the study; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import yaml

from faithful_train.commands.cli import main
from tests.integration.tiny import TINY, read_csv

PAIR = ["-c", "configs/quickstart.yaml", "-c", "configs/quickstart-baseline.yaml"]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def read(out):
    return read_csv(out / "repro.csv")


def test_repro_writes_the_spread_the_paired_difference_and_the_plot(tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["repro", *PAIR, "--seeds", "2", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "# repro: quickstart, quickstart-baseline over 2 seeds" in printed
    assert "## Paired difference: quickstart − quickstart-baseline" in printed
    rows = read(out)
    assert [(r["config"], r["seed"], r["state"]) for r in rows] == [
        ("quickstart", "0", "complete"),
        ("quickstart", "1", "complete"),
        ("quickstart-baseline", "0", "complete"),
        ("quickstart-baseline", "1", "complete"),
    ]
    assert "audit/interchange/iia >= 0.9" in rows[0]  # the threshold's verdict per seed
    assert rows[0]["val/task_loss"] != rows[1]["val/task_loss"]  # the seed changes the run
    assert (out / "repro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    figure = summary["configs"]["quickstart"]["figures"]["val/task_loss"]
    values = [float(r["val/task_loss"]) for r in rows[:2]]
    assert figure["mean"] == pytest.approx(sum(values) / 2) and figure["n"] == 2
    assert figure["min"] == pytest.approx(min(values)) and figure["max"] == pytest.approx(max(values))
    diff = summary["paired"]["val/task_loss"]
    base = [float(r["val/task_loss"]) for r in rows[2:]]
    assert diff["mean"] == pytest.approx((values[0] - base[0] + values[1] - base[1]) / 2)
    threshold = summary["configs"]["quickstart-baseline"]["thresholds"]["audit/interchange/iia"]
    assert threshold["threshold"] == ">= 0.9" and threshold["n"] == 2
    md = (out / "repro.md").read_text()
    assert "| figure | mean | sd | 95% CI | min | max | n |" in md and "sign test p" in md
    # each seed's row is what `fit` gives with that seed
    run = tmp_path / "fit-seed1"
    assert main(["fit", "-c", "configs/quickstart.yaml", "--run-dir", str(run), "seed=1", *TINY]) == 0
    alone = json.loads((run / "summary.json").read_text())["metrics"]
    assert float(rows[1]["val/task_loss"]) == pytest.approx(alone["val/task_loss"], abs=1e-6)
    assert float(rows[1]["audit/interchange/iia"]) == pytest.approx(alone["audit/interchange/iia"], abs=1e-6)
    # a second invocation continues the study: nothing runs again, the same table; --table puts
    # the headline rows into a README's marked table, replacing this pair's rows, keeping others
    before = (out / "repro.csv").read_text()
    readme = tmp_path / "README.md"
    other = "| `other` vs `other-baseline` | `val/task_acc` | 1 | 5/5 | 0 | 0/5 | +1 | 5, 2026-01-01 |"
    stale = "| `quickstart` vs `quickstart-baseline` | `val/task_acc` | stale |"
    readme.write_text(f"# x\n\n<!-- repro:start -->\n{other}\n{stale}\n<!-- repro:end -->\n\nafter\n")
    assert main(["repro", *PAIR, "--seeds", "2", "--out", str(out), "--table", str(readme), *TINY]) == 0
    assert (out / "repro.csv").read_text() == before
    text = readme.read_text()
    assert other in text and stale not in text and text.endswith("<!-- repro:end -->\n\nafter\n")
    rows = [r for r in text.splitlines() if r.startswith("| `quickstart` vs `quickstart-baseline`")]
    assert [r.split("|")[2].strip() for r in rows] == ["`audit/interchange/iia` `>= 0.9`", "`val/task_acc`"]
    iia = summary["configs"]["quickstart"]["figures"]["audit/interchange/iia"]
    assert f"{iia['mean']:.3f} [{iia['low']:.3f}, {iia['high']:.3f}]" in rows[0]
    assert main(["repro", *PAIR, "--seeds", "2", "--out", str(out), "--table", str(tmp_path / "none.md")]) == 2
    # the same directory with a config that has changed since: refused, not mixed
    capsys.readouterr()
    assert main(["repro", *PAIR, "--seeds", "2", "--out", str(out), *TINY, "optim.lr=1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "quickstart.yaml has changed since the study" in err, err
    assert (out / "repro.csv").read_text() == before


@pytest.mark.slow  # two more runs: in make test-slow (CI runs both), to keep make test under its budget
def test_strict_exits_1_when_a_threshold_fails_in_some_seed(tmp_path, capsys):
    out = tmp_path / "repro"
    args = ["repro", "-c", "configs/quickstart.yaml", "--seeds", "2", "--out", str(out), *TINY]
    assert main([*args, "--strict", "audits.0.thresholds={iia: '>= 0.0', task_acc: '>= 0.99'}"]) == 1
    printed = capsys.readouterr().out
    assert "task_acc >= 0.99 passed in 0/2 seeds" in printed
    assert "Thresholds: `audit/interchange/iia >= 0`: **2/2**" in (out / "repro.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-c", "configs/quickstart.yaml", "--seeds", "0"], "--seeds must be a whole number >= 1, got 0"),
        (["-c", "configs/no-such.yaml"], "-c configs/no-such.yaml: config not found"),
        (
            ["-c", "configs/quickstart.yaml", "-c", "configs/right-reasons-decoy.yaml"],
            "a paired difference needs the same task",
        ),
        (
            ["-c", "configs/quickstart.yaml", "-c", "configs/quickstart.yaml"],
            "-c configs/quickstart.yaml: given twice",
        ),
        (["-c", "configs/quickstart.yaml", "-c", "{no_audits}"], "shares no audit figure"),
        (["-c", "configs/quickstart.yaml", "objectives.0.nonsense=1"], "-c configs/quickstart.yaml: "),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, args, message):
    config = yaml.safe_load(open("configs/quickstart-baseline.yaml"))
    config["audits"] = [{"name": "ablation", "every_n_steps": 10, "n_examples": 32, "circuit": ["blocks.0.mlp.out"]}]
    (tmp_path / "no-audits.yaml").write_text(yaml.safe_dump(config))
    args = [a.format(no_audits=tmp_path / "no-audits.yaml") for a in args]
    out = tmp_path / "repro"
    assert main(["repro", *args, "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()
