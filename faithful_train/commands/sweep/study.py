"""The sweep's Optuna study and its storage: opening (or continuing) it, recovering trials left
running by a stopped sweep, and telling results."""

from __future__ import annotations

import os
import socket
from typing import Any

from faithful_train.commands.sweep.spec import Sweep
from faithful_train.errors import ConfigError, first_line


def open_study(sweep: Sweep, storage: str) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sweep.sampler == "grid":
        sampler = optuna.samplers.GridSampler(sweep.grid(), seed=sweep.seed)
    elif sweep.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=sweep.seed)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=sweep.seed)
    try:
        engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
        store = optuna.storages.RDBStorage(storage, engine_kwargs=engine)
        return optuna.create_study(
            study_name=sweep.name, storage=store, directions=sweep.directions, sampler=sampler, load_if_exists=True
        )
    except Exception as e:  # a driver that is not installed, a server that does not answer, a bad URL
        raise ConfigError(f"--storage {storage}: cannot open it: {first_line(e)}") from None


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


def recover(study: Any) -> int:
    """Trials left running by a sweep that was stopped (their process on this host is gone) are
    marked failed and their parameters queued to run again; returns how many."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    again = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _alive(int(t.user_attrs.get("pid", -1))):
            _tell(study, t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
            again += 1
    return again
