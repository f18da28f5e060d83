"""Recipe: fine-tune a Hugging Face model, loaded from a local directory, through a concept
bottleneck inserted after one of its layers.

    python recipes/finetune_hf_concepts.py MODEL_DIR [key=value ...]
    python recipes/finetune_hf_concepts.py --make-tiny MODEL_DIR [key=value ...]

MODEL_DIR is any local ``save_pretrained`` directory of a supported family (gpt2, llama,
mixtral, qwen2_moe, olmoe); nothing is downloaded (``--make-tiny`` first saves a tiny random
llama there). The bottleneck reads ``blocks.{layer}.resid_post`` at the answer position; the
layers above it are not run. It is configs/concepts-joint.yaml with the model swapped, so every
key of that config can be overridden (e.g. ``model.bottleneck.mode=hard objectives.0.leakage=0``).
"""

import sys
from pathlib import Path

from faithful_train.modeling.hf import HFAdapter
from faithful_train.tasks.concept_objects import ConceptObjects
from faithful_train.training import run as runs
from faithful_train.training.config import load_config
from faithful_train.training.rundir import format_summary

CONFIG = "configs/concepts-joint.yaml"


def make_tiny_llama(path: Path) -> None:
    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    HFAdapter.from_config("llama", config, vocab_size=ConceptObjects().vocab_size, seed=0).save_pretrained(path)


def main(model_dir: str, *overrides: str) -> None:
    runs.quiet_lightning()
    model = f"model={{arch: hf, path: {model_dir}, bottleneck: {{mode: hybrid, side_width: 8, layer: 1}}}}"
    cfg = load_config(CONFIG, [model, "run_dir=runs/finetune-hf-concepts", *overrides])
    summary = runs.fit(runs.build(cfg, cfg.run_dir, Path(CONFIG).parent))
    print(format_summary(summary))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--make-tiny"]:
        make_tiny_llama(Path(args[1]))
        args = args[1:]
    main(*args)
