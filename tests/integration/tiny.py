"""What the sweep and repro tests share: the overrides that make a quickstart run tiny (20 steps,
audits on 32 examples), and reading a CSV the commands write."""

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


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))
