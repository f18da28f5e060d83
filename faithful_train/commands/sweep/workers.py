"""Running a sweep: check it, open its study, run trials in worker processes that share a count of
slots and write the results under a file lock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faithful_train.commands.sweep.report import write_results
from faithful_train.commands.sweep.spec import check, load_sweep
from faithful_train.commands.sweep.study import open_study, recover
from faithful_train.commands.sweep.trial import run_trial
from faithful_train.errors import ConfigError, FaithfulError


def _worker(
    sweep_path: str, extra: list[str], pruning: bool, out: str, storage: str, slots: Any, threads: int, lock_path: str
) -> None:
    """One process: claim a slot, run a trial, write the results; until no slot is left."""
    import fcntl

    import torch

    from faithful_train.training import run as runs

    torch.set_num_threads(threads)
    runs.quiet_lightning()
    sweep = load_sweep(sweep_path, extra)
    if not pruning:
        sweep.margin = None
    study = open_study(sweep, storage)
    while True:
        with slots.get_lock():
            if slots.value <= 0:
                return
            slots.value -= 1
        run_trial(sweep, study, Path(out))
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            write_results(sweep, study, Path(out))


def run_sweep(
    sweep_path: str | Path,
    out: str | Path | None = None,
    trials: int | None = None,
    workers: int = 1,
    storage: str | None = None,
    threads: int = 1,
    extra: list[str] | tuple[str, ...] = (),
    pruning: bool = True,
) -> dict[str, Any]:
    """Check the sweep, open (or continue) its study, add ``trials`` trials with ``workers``
    processes, and write the results. Returns the sweep's summary."""
    import multiprocessing as mp

    from optuna.trial import TrialState

    extra = list(extra)
    sweep = load_sweep(sweep_path, extra)
    if workers < 1 or threads < 1:
        raise ConfigError(f"--workers and --threads must be >= 1, got {workers} and {threads}")
    if trials is not None and trials < 0:
        raise ConfigError(f"--trials must be >= 0, got {trials}")
    out = Path(out) if out is not None else Path("runs") / "sweeps" / sweep.name
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a directory")
    check(sweep)
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{(out / 'study.db').resolve()}"
    study = open_study(sweep, storage)
    out.mkdir(parents=True, exist_ok=True)
    rerun = recover(study)
    if trials is None:
        trials = sweep.grid_size() if sweep.sampler == "grid" else 8
    if sweep.sampler == "grid":  # a grid point runs once
        taken = len(
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        )
        trials = min(trials, max(0, sweep.grid_size() - taken))
    trials += rerun
    ctx = mp.get_context("spawn")
    slots = ctx.Value("i", trials)
    lock = str(out / ".results.lock")
    if workers == 1 or trials <= 1:
        _worker(str(sweep.path), extra, pruning, str(out), storage, slots, threads, lock)
    else:
        procs = [
            ctx.Process(target=_worker, args=(str(sweep.path), extra, pruning, str(out), storage, slots, threads, lock))
            for _ in range(min(workers, trials))
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode]
        if failed:
            raise FaithfulError(
                f"{len(failed)} sweep worker(s) stopped with exit status {failed[0]}; "
                f"see the trials in {out / 'trials.csv'}"
            )
    return write_results(sweep, study, out)
