"""Sweeps on a real database across processes: a PostgreSQL server started for the test
(``initdb``/``pg_ctl`` on a temporary directory and port), two ``faithful-train sweep --storage
postgresql://...`` workers sharing one study, one of them SIGKILLed mid-trial. The study must
finish with every grid point counted once, the killed trial run again, and the figures those of
a one-process run.

Skipped, with the reason, where PostgreSQL (Debian's ``postgresql`` package) or the psycopg
driver is absent, unless ``FAITHFUL_TRAIN_REQUIRE_POSTGRES=1`` (CI sets it: there the test
must run)."""

from __future__ import annotations

import csv
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

pytestmark = pytest.mark.distributed

WEIGHTS = [0.0, 0.1, 1.0, 10.0]
TRIAL = [  # long enough (several seconds) to be killed in the middle
    "trainer.max_steps=200",
    "trainer.val_every=100",
    "audits.0.every_n_steps=100",
    "audits.0.n_examples=32",
    "data.val_size=32",
    "data.batch_size=16",
]


def _binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _unavailable() -> str | None:
    if _binary("initdb") is None or _binary("pg_ctl") is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install 'psycopg[binary]'; in the test extra)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: initdb refuses root"
    return None


@pytest.fixture
def postgres():
    """A PostgreSQL server on a free port for this test; yields its URL."""
    reason = _unavailable()
    if reason:
        if os.environ.get("FAITHFUL_TRAIN_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="ft-postgres-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the postgres user
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(
        [*as_user, _binary("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*as_user, _binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, _binary("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _sweep_file(repo: Path, tmp_path: Path) -> Path:
    spec = yaml.safe_load((repo / "configs" / "sweeps" / "iit-weight.yaml").read_text())
    spec["base"] = str(repo / "configs" / "quickstart.yaml")
    spec["space"] = {"objectives.0.weight": {"grid": WEIGHTS}}
    spec.pop("pruning")
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep(repo: Path, sweep: Path, out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "faithful_train.commands.cli", "sweep", "-c", str(sweep), "--out", str(out), *args]
    return subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _figures(out: Path) -> dict[str, tuple[str, str]]:
    with open(out / "trials.csv") as f:
        done = [r for r in csv.DictReader(f) if r["state"] == "complete"]
    weights = [r["objectives.0.weight"] for r in done]
    assert len(weights) == len(set(weights)), f"a grid point ran twice: {weights}"
    return {r["objectives.0.weight"]: (r["val/task_acc"], r["audit/interchange/iia"]) for r in done}


def test_two_workers_share_a_postgresql_study_and_a_killed_trial_runs_again(repo, tmp_path, postgres):
    sweep = _sweep_file(repo, tmp_path)
    out = tmp_path / "shared"
    storage = ["--storage", postgres, *TRIAL]
    first = _sweep(repo, sweep, out, *storage)
    second = _sweep(repo, sweep, out, *storage)
    study_name = "shared"
    deadline = time.monotonic() + 180
    victim = None
    while victim is None and time.monotonic() < deadline:  # the first worker, in the middle of a trial
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name=study_name, storage=postgres).get_trials()
        except KeyError:  # not created yet
            continue
        running = [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("pid") == first.pid]
        if running and (Path(running[0].user_attrs.get("run_dir", "/nonexistent")) / "metrics.csv").exists():
            victim = running[0].number
    assert victim is not None, "the first worker never started a trial"
    first.send_signal(signal.SIGKILL)
    first.wait()
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err[-3000:]

    trials = optuna.load_study(study_name=study_name, storage=postgres).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.params["objectives.0.weight"] for t in complete) == WEIGHTS  # each point once
    killed = trials[victim]
    assert killed.state.name == "FAIL"
    again = [t for t in trials if t.user_attrs.get("rerun_of") == victim]
    assert len(again) == 1 and again[0].state.name == "COMPLETE" and again[0].params == killed.params
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]

    alone = tmp_path / "alone"  # one process, SQLite: the same figures
    one = _sweep(repo, sweep, alone, *TRIAL)
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-3000:]
    assert _figures(out) == _figures(alone)
