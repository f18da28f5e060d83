"""The sweep's Optuna study and its storage: opening (or continuing) it, planning a grid's trials,
handing the next trial to a worker, re-running trials whose worker died, and telling results.

Workers on one machine or many share the study through its database. Three things make that
safe without a coordinator:

- **A grid is planned once.** The process that creates the study enqueues every point (times
  its replicates) as a waiting trial; every worker then takes waiting trials, and the storage
  hands each to exactly one (Optuna sets a waiting trial running under a row lock). Processes
  that find the study already there wait until it is planned.
- **Heartbeats.** A worker records a heartbeat for its trial every ``HEARTBEAT`` seconds. A
  running trial whose heartbeat is older than ``GRACE`` seconds (its machine or process died)
  is marked failed and queued again with the same point and seed (``fail_stale_trials``).
- **Dead processes on this host** are found at once by pid (``recover``), without waiting for
  the grace period: a sweep stopped with Ctrl-C or ``kill -9`` and started again continues.

A re-run trial records ``rerun_of`` (the failed trial's number); the tables count the re-run.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from typing import Any

from faithful_train.commands.sweep.spec import Sweep, fingerprints
from faithful_train.errors import ConfigError, first_line

HEARTBEAT = 5  # seconds between a running trial's heartbeats
GRACE = 60  # a running trial silent this long is failed and queued again
PLANNED = "planned"  # study user attribute: the grid's trials are enqueued
PLANNING = "planning"  # set before the first is: others wait for PLANNED
FINGERPRINTS = "fingerprints"  # study user attribute: the configs' hashes when it began


def _storage(url: str, grace: int) -> Any:
    import optuna

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine,
        heartbeat_interval=HEARTBEAT,
        grace_period=grace,
        heartbeat_stale_trial_callback=requeue,
    )


def _sampler(sweep: Sweep) -> Any:
    import optuna

    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(sweep.grid(), seed=sweep.seed)
    if sweep.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=sweep.seed)
    return optuna.samplers.NSGAIISampler(seed=sweep.seed)


def open_study(sweep: Sweep, storage: str, grace: int = GRACE) -> Any:
    """Open the sweep's study (creating it if need be); a grid is planned by its creator."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        store = _storage(storage, grace)
        try:
            study = optuna.create_study(
                study_name=sweep.name, storage=store, directions=sweep.directions, sampler=_sampler(sweep)
            )
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=sweep.name, storage=store, sampler=_sampler(sweep))
            created = False
    except Exception as e:  # a driver that is not installed, a server that does not answer, a bad URL
        raise ConfigError(f"--storage {storage}: cannot open it: {first_line(e)}") from None
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in sweep.directions]:
        raise ConfigError(
            f"--storage {storage}: study {sweep.name!r} there optimises other figures; use another --out or --storage"
        )
    check_fingerprints(study, sweep, storage)
    if sweep.sampler == "grid":
        plan(study, sweep, created)
    return study


def check_fingerprints(study: Any, sweep: Sweep, storage: str) -> None:
    """The study's trials were trained with the configs as they are now (``spec.fingerprints``);
    a study started with another version of a config is refused, naming it."""
    now = fingerprints(sweep)
    before = study.user_attrs.get(FINGERPRINTS)
    if before is None:
        study.set_user_attr(FINGERPRINTS, now)
        return
    changed = [label for label in now if label in before and before[label] != now[label]]
    if changed:
        path = (sweep.configs or {}).get(changed[0], sweep.base)
        raise ConfigError(
            f"{path} has changed since the study in {storage} ran it (or the overrides differ); "
            "its runs would mix two recipes: use another --out (or --storage), or delete that study"
        )


def plan(study: Any, sweep: Sweep, created: bool, wait: float = 60.0) -> None:
    """Enqueue every grid point × replicate not in the study yet, once: by the study's creator;
    a process that finds a new, empty study waits for the creator's plan (and plans itself if
    none comes); a study from before plans existed is planned around the trials it holds."""
    from optuna.trial import TrialState

    if not created:  # another process created it a moment ago and is planning it: wait for that
        deadline = time.monotonic() + wait
        while not study.user_attrs.get(PLANNED) and (
            study.user_attrs.get(PLANNING) or not study.get_trials(deepcopy=False)
        ):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
            study = _reload(study)
        if study.user_attrs.get(PLANNED):
            return
    study.set_user_attr(PLANNING, True)
    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    have = {_key(t.params, t.user_attrs.get("replicate")) for t in study.get_trials(deepcopy=False, states=live)}
    for point in sweep.points():
        for replicate in range(sweep.replicates):
            if _key(point, replicate if sweep.replicates > 1 or sweep.configs else None) not in have:
                study.enqueue_trial(point, user_attrs=_replicate_attrs(sweep, replicate))
    study.set_user_attr(PLANNED, True)


def _reload(study: Any) -> Any:
    import optuna

    return optuna.load_study(study_name=study.study_name, storage=study._storage, sampler=study.sampler)


def _key(params: dict[str, Any], replicate: int | None) -> tuple[Any, ...]:
    return (tuple(sorted((k, repr(v)) for k, v in params.items())), replicate)


def _replicate_attrs(sweep: Sweep, replicate: int) -> dict[str, Any]:
    return {"replicate": replicate} if sweep.replicates > 1 or sweep.configs else {}


def next_trial(study: Any, sweep: Sweep) -> Any | None:
    """The next trial for this worker: a waiting one (re-runs first, then planned points and
    sibling replicates in order) or, for samplers that propose points, a new one; ``None`` when
    a grid has nothing left."""
    import optuna
    from optuna.trial import TrialState

    fail_stale_trials(study)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    for t in sorted(waiting, key=lambda t: ("rerun_of" not in t.user_attrs, t.number)):
        try:  # the storage sets a waiting trial running for one process only (a row lock)
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None if sweep.sampler == "grid" else study.ask()


def fail_stale_trials(study: Any) -> None:
    import optuna

    optuna.storages.fail_stale_trials(study)


def others_running(study: Any) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


class Heartbeat:
    """Records a trial's heartbeat every ``HEARTBEAT`` seconds while the ``with`` block runs."""

    def __init__(self, study: Any, trial: Any):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a database hiccup: the next beat tries again
                pass
            if self.stop.wait(HEARTBEAT):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tell(study: Any, trial: Any, values: list[float] | None = None, state: Any = None) -> None:
    """``study.tell``; the grid sampler calls ``study.stop()`` once its grid is used up, which
    raises outside ``study.optimize`` after the result is stored: that is not an error here."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def requeue(study: Any, trial: Any) -> None:
    """Queue a failed trial's point and seed again (the storage's stale-trial callback too)."""
    attrs = {"rerun_of": trial.number}
    if "replicate" in trial.user_attrs:
        attrs["replicate"] = trial.user_attrs["replicate"]
    study.enqueue_trial(trial.params, user_attrs=attrs)


def recover(study: Any) -> int:
    """Trials left running by a process on this host that is gone are marked failed and queued
    to run again; returns how many."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    again = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and pid is not None and not _alive(int(pid)):
            try:
                if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    continue
            except Exception:  # another worker finished or failed it first
                continue
            requeue(study, t)
            again += 1
    return again
