"""Recipe: fine-tune a Hugging Face model, loaded from a local directory, with the
interchange objective and audit.

    python recipes/finetune_hf.py MODEL_DIR [key=value ...]

MODEL_DIR is any local ``save_pretrained`` directory of a supported family (gpt2, llama,
mixtral, qwen2_moe, olmoe). Nothing is downloaded: with no MODEL_DIR argument but
``--make-tiny MODEL_DIR``, the recipe first saves a tiny random gpt2 there to try it out.
The alignment is written in canonical site names, the same as for our own models.
"""

import sys
from pathlib import Path

from omegaconf import OmegaConf

from faithful_train.modeling.hf import HFAdapter
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.training import run as runs
from faithful_train.training.config import apply_overrides, compose
from faithful_train.training.rundir import format_summary


def make_tiny_gpt2(path: Path) -> None:
    config = {
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 64,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    HFAdapter.from_config("gpt2", config, vocab_size=HierarchicalEquality().vocab_size, seed=0).save_pretrained(path)


def main(model_dir: str, *overrides: str) -> None:
    runs.quiet_lightning()
    alignment = {
        "left": {"site": "blocks.0.resid_post", "positions": [3], "dims": [0, 32]},
        "right": {"site": "blocks.0.resid_post", "positions": [3], "dims": [32, 64]},
    }
    raw = OmegaConf.create(
        {
            "model": {"arch": "hf", "path": model_dir},
            "task": {"name": "hierarchical_equality", "n_symbols": 16},
            "objectives": [{"name": "interchange", "alignment": alignment}],
            "audits": [{"name": "interchange", "alignment": alignment, "every_n_steps": 250}],
            "trainer": {"max_steps": 3000, "val_every": 250},
            "optim": {"lr": 1e-3, "weight_decay": 0.01},
            "run_dir": "runs/finetune-hf",
        }
    )
    apply_overrides(raw, list(overrides))  # e.g. trainer.max_steps=500 run_dir=runs/mine
    cfg = compose(raw)  # validated like any config file
    summary = runs.fit(runs.build(cfg, cfg.run_dir))
    print(format_summary(summary))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--make-tiny"]:
        make_tiny_gpt2(Path(args[1]))
        args = args[1:]
    main(*args)
