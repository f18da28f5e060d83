"""Run a config under ``trainer.strategy=fsdp`` with a callback that records, on every rank, which
parameters hold a gradient before the first optimizer step: ``python fsdp_probe.py OUT CONFIG
[key=value ...]`` writes ``OUT/grads.<rank>.json`` (Lightning starts the second process by
running this script again)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch import Callback

from faithful_train.training import run as runs
from faithful_train.training.config import load_config


class GradientProbe(Callback):
    def __init__(self, out: Path):
        self.out, self.done = out, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.done:
            return
        self.done = True
        record = {
            name: {"trainable": p.requires_grad, "grad": p.grad is not None, "sharded": type(p).__name__ == "DTensor"}
            for name, p in pl_module.named_parameters()
        }
        (self.out / f"grads.{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out, config, *overrides = sys.argv[1:]
    out = Path(out)
    runs.quiet_lightning()
    run = runs.build(load_config(config, overrides), out / "run")
    runs.fit(run, extra_callbacks=[GradientProbe(out)])


if __name__ == "__main__":
    main()
