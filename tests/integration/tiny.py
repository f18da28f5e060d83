"""What the integration tests share: the overrides that make a quickstart run tiny (20 steps,
audits on 32 examples), runs of configs for a module's fixture, and reading a CSV the commands
write."""

from __future__ import annotations

import csv
from pathlib import Path

TINY = [
    "trainer.max_steps=20",
    "trainer.val_every=10",
    "audits.0.every_n_steps=10",
    "audits.0.n_examples=32",
    "data.val_size=32",
    "data.batch_size=16",
]


def fit_configs(root: Path, names: list[str], overrides: list[str]) -> Path:
    """``faithful-train fit -c configs/<name>.yaml --run-dir <root>/<name> <overrides>`` for each
    name, from the repository (a module fixture's runs); returns ``root``."""
    import os

    from faithful_train.commands.cli import main
    from tests.conftest import REPO

    old = os.getcwd()
    os.chdir(REPO)
    try:
        for name in names:
            assert main(["fit", "-c", f"configs/{name}.yaml", "--run-dir", str(root / name), *overrides]) == 0
    finally:
        os.chdir(old)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))
