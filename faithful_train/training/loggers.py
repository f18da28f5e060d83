"""The run's loggers: ``metrics.csv`` (``rundir.RunCSVLogger``) and wandb, offline unless the
config turns it online; an online run is checked (API key, server reachable) before anything
is written, so no network is a one-line error, not a traceback after a long wait."""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from faithful_train.errors import ConfigError
from faithful_train.training.config import written
from faithful_train.training.metrics_csv import RunCSVLogger

WANDB_DEFAULT_URL = "https://api.wandb.ai"


def check_wandb(cfg: DictConfig, timeout: float = 5.0) -> None:
    """With ``logger.wandb.mode=online``: an API key and a reachable server, else a ``ConfigError``
    saying so (and that ``offline`` logs now and syncs later)."""
    if cfg.logger.wandb.mode != "online":
        return
    url = os.environ.get("WANDB_BASE_URL", WANDB_DEFAULT_URL)
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    hint = "use logger.wandb.mode=offline (then `wandb sync`) or disabled"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_key(host):
        raise ConfigError(f"logger.wandb.mode=online needs a wandb API key (WANDB_API_KEY or `wandb login`); {hint}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"logger.wandb.mode=online, but the wandb server {url} cannot be reached ({e.strerror or e}); {hint}"
        ) from None


def _netrc_key(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def make_loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None, csv_rows: int | None = None) -> list[Logger]:
    """Our CSV log, and wandb unless disabled (offline by default; a resumed run continues its wandb run)."""
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(RunCSVLogger(run_dir, resume_step, csv_rows))
    wandb_cfg = cfg.logger.wandb
    if wandb_cfg.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),
                project=wandb_cfg.project,
                name=wandb_cfg.name or run_dir.name,
                entity=wandb_cfg.entity,
                tags=list(wandb_cfg.tags),
                mode=wandb_cfg.mode,  # offline unless the user turns it online
                config=written(cfg),  # values from the environment stay ${oc.env:VAR}
                resume="allow" if resume_step is not None else None,
                id=_wandb_id(run_dir) if resume_step is not None else None,
            )
        )
    return loggers


def _wandb_id(run_dir: Path) -> str | None:
    """The id of the wandb run already in this run directory, so a resumed run continues it."""
    runs = sorted((run_dir / "wandb").glob("*run-*"))
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def finish_wandb(trainer: L.Trainer) -> None:
    """Close this run's wandb run: wandb keeps one run per process, and a later ``fit`` in the
    same process (a recipe training several models) would otherwise log into this one."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish()
