"""Running a sweep: check it, open its study, run trials in worker processes that share a count of
slots and write the results under a file lock."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faithful_train.commands.sweep.report import write_results
from faithful_train.commands.sweep.spec import Sweep, check, load_sweep
from faithful_train.commands.sweep.study import (
    GRACE,
    HEARTBEAT,
    fail_stale_trials,
    next_trial,
    open_study,
    others_running,
    recover,
)
from faithful_train.commands.sweep.trial import run_trial
from faithful_train.errors import ConfigError, FaithfulError

Writer = Callable[[Sweep, Any, Path], dict[str, Any]]
UNTIL_DONE = 2**31 - 1  # slots of a grid run without --trials: until nothing waits or runs


def _worker(
    sweep: Sweep, out: str, storage: str, slots: Any, threads: int, lock_path: str, write: Writer, grace: int
) -> None:
    """One process: claim a slot, run a trial, write the results; until no slot (or, on a grid,
    no trial) is left. A grid's worker whose queue is empty while other workers' trials run waits
    for them: a trial whose worker dies is queued again, and someone must run it."""
    import fcntl

    import torch

    from faithful_train.training import run as runs

    torch.set_num_threads(threads)
    runs.quiet_lightning()
    study = open_study(sweep, storage, grace)
    while True:
        with slots.get_lock():
            if slots.value <= 0:
                return
            slots.value -= 1
        trial = next_trial(study, sweep)
        while trial is None:  # a grid with nothing waiting
            recover(study)
            fail_stale_trials(study)
            trial = next_trial(study, sweep)
            if trial is None and not others_running(study):
                return
            if trial is None:
                time.sleep(min(HEARTBEAT, 2))
        run_trial(sweep, study, Path(out), trial)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write(sweep, study, Path(out))


def die_with_parent() -> None:
    """Ask Linux to end this process when its parent dies (``PR_SET_PDEATHSIG``): a worker must
    not train on, holding a core, after ``faithful-train sweep``/``repro`` is killed. Elsewhere,
    nothing."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _child(target: Callable[..., None], *args: Any) -> None:
    """A worker process's entry: dies with its parent, then runs ``target``."""
    die_with_parent()
    target(*args)


def run_study(
    sweep: Sweep,
    out: Path,
    trials: int | None,
    workers: int,
    storage: str | None,
    threads: int,
    write: Writer,
    grace: int = GRACE,
) -> dict[str, Any]:
    """Open (or continue) ``sweep``'s study, run ``trials`` trials (a grid: every trial not run
    yet) with ``workers`` processes here, and write the results with ``write``."""
    import multiprocessing as mp

    from optuna.trial import TrialState

    if workers < 1 or threads < 1:
        raise ConfigError(f"--workers and --threads must be >= 1, got {workers} and {threads}")
    if trials is not None and trials < 0:
        raise ConfigError(f"--trials must be >= 0, got {trials}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a directory")
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(out / 'study.db').resolve()}"
    study = open_study(sweep, storage, grace)
    out.mkdir(parents=True, exist_ok=True)
    rerun = recover(study)
    if sweep.sampler == "grid":  # the planned trials still waiting, re-runs included
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        # without --trials a worker runs until the grid is done, including trials queued again
        # after it started (another worker died): no count fixed at the start can know those
        trials = UNTIL_DONE if trials is None else min(trials * sweep.replicates + rerun, waiting)
        if not waiting and not others_running(study):  # done already: no worker to start
            trials = 0
    else:
        trials = (8 if trials is None else trials) * sweep.replicates + rerun
    ctx = mp.get_context("spawn")
    slots = ctx.Value("i", trials)
    lock = str(out / ".results.lock")
    args = (sweep, str(out), storage, slots, threads, lock, write, grace)
    if workers == 1 or trials <= 1:
        _worker(*args)
    else:
        procs = [ctx.Process(target=_child, args=(_worker, *args)) for _ in range(min(workers, max(trials, 1)))]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode]
        if failed:
            raise FaithfulError(
                f"{len(failed)} worker(s) stopped with exit status {failed[0]}; see the trials in {out}"
            )
    return write(sweep, study, out)


def run_sweep(
    sweep_path: str | Path,
    out: str | Path | None = None,
    trials: int | None = None,
    workers: int = 1,
    storage: str | None = None,
    threads: int = 1,
    extra: list[str] | tuple[str, ...] = (),
    pruning: bool = True,
    grace: int = GRACE,
) -> dict[str, Any]:
    """Check the sweep, open (or continue) its study, add ``trials`` points (each over its
    replicates) with ``workers`` processes, and write the results. Returns the sweep's summary."""
    sweep = load_sweep(sweep_path, list(extra))
    if not pruning:
        sweep.margin = None
    out = Path(out) if out is not None else Path("runs") / "sweeps" / sweep.name
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a directory")
    check(sweep)
    return run_study(sweep, out, trials, workers, storage, threads, write_results, grace)
