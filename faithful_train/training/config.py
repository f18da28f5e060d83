"""Experiment configs: omegaconf YAML checked against a schema.

A config names a model preset (``models/<name>.yaml``, merged with any keys beside it), a
task, objectives, audits, and trainer/optimizer/data/logger settings. ``key=value``
overrides from the command line apply before the preset is resolved, so ``model=moe-tiny``
swaps the architecture. Unknown keys and wrong types raise ``ConfigError`` naming the key
and the valid ones. Objective, audit and task entries are ``{name: ..., **arguments}`` and
are checked against their classes when the run is built (``registry.py``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from faithful_train.errors import ConfigError, UnknownNameError, first_line

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the repository: its models/ and configs/
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class TrainerSection:
    max_steps: int = 1000
    val_every: int = 100  # validation cadence (steps)
    val_generation: bool = True  # val/gen_acc on text rows with steps: greedy rationale + answer from the prompt
    log_every: int = 10
    checkpoint_every: int = 0  # 0: at every validation
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    progress_bar: bool = True
    deterministic: bool = False
    on_nonfinite: str = "stop"  # a non-finite loss or term: stop (exit 3) | skip the step
    max_skipped_steps: int = 10  # skip: stop after this many skipped steps in a row


@dataclass
class OptimSection:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 0
    decay: str = "none"  # none | cosine (to min_lr_ratio * lr at schedule_steps)
    min_lr_ratio: float = 0.1
    schedule_steps: int | None = None  # steps the decay spans (default: trainer.max_steps of the run's first start)
    freeze: list[str] = field(
        default_factory=list
    )  # model parameters that never train (fnmatch patterns of their names)


@dataclass
class DataSection:
    batch_size: int = 128
    val_size: int = 512
    val_batch_size: int = 512


@dataclass
class WandbSection:
    mode: str = "offline"  # offline | online | disabled
    project: str = "faithful_train"
    name: str | None = None
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerSection:
    wandb: WandbSection = field(default_factory=WandbSection)
    csv: bool = True


@dataclass
class LossSection:
    """The task loss: ``answer`` weighs the mean cross-entropy of the answer tokens. (A language-
    model loss on every token is the ``language_model`` objective.)"""

    answer: float = 1.0


@dataclass
class ExperimentConfig:
    seed: int = 0
    run_dir: str | None = None
    strict: bool = False  # a failed pre-registered threshold fails the run (exit 1); also --strict
    model: Any = MISSING
    task: Any = MISSING
    objectives: list[Any] = field(default_factory=list)
    audits: list[Any] = field(default_factory=list)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    logger: LoggerSection = field(default_factory=LoggerSection)


@dataclass
class BottleneckSection:
    """A concept bottleneck after block ``layer`` (``faithful_train.modeling.bottleneck``)."""

    mode: str = "hard"  # hard | hybrid | embedding
    layer: int | None = None  # default: the last block
    concepts: list[str] | None = None  # default: every concept the task labels
    side_width: int = 8  # hybrid: width of the side channel
    side_noise: float = 1.0  # hybrid: std of the side channel's training noise
    embedding_dim: int = 16  # embedding: size of each concept value's embedding
    head_hidden: int = 64  # hidden width of the head (0: linear)
    discrete: bool = False  # hard: 0/1 concepts with a straight-through gradient


@dataclass
class LoraSection:
    """LoRA adapters (``peft``) on the model's linear layers; everything else is frozen."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # default: qkv (ours), c_attn (gpt2), q_proj + v_proj (others)


@dataclass
class TransformerModelSection:
    arch: str = "transformer"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 256
    n_experts: int = 0
    top_k: int = 2
    tie_embeddings: bool = False
    vocab_size: int | None = None  # default: the task's
    max_seq_len: int | None = None  # default: the task's
    bottleneck: BottleneckSection | None = None
    lora: LoraSection | None = None
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass


@dataclass
class HFModelSection:
    arch: str = "hf"
    family: str | None = None  # gpt2 | llama | mixtral | qwen2_moe (with `config`)
    config: dict[str, Any] = field(default_factory=dict)  # the family's HF config arguments
    path: str | None = None  # a local directory saved with save_pretrained
    bottleneck: BottleneckSection | None = None
    lora: LoraSection | None = None
    activation_checkpointing: bool = False  # transformers' checkpointing of the decoder layers (non-reentrant)


MODEL_SECTIONS = {"transformer": TransformerModelSection, "hf": HFModelSection}
WANDB_MODES = ("offline", "online", "disabled")
LR_DECAYS = ("none", "cosine")
NONFINITE_POLICIES = ("stop", "skip")


# keys of earlier versions, and where what they did lives now
MOVED_KEYS = {
    "loss.lm": "the language-model loss is an objective, objectives: [{name: language_model, weight: <loss.lm>}, ...]",
}


def _check_keys(data: Any, schema: type, prefix: str) -> None:
    """Unknown keys anywhere under a dataclass schema -> one error naming key and valid ones."""
    if not isinstance(data, (dict, DictConfig)):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in MOVED_KEYS:
            raise ConfigError(f"config key '{full}' is gone: {MOVED_KEYS[full]}")
        if key not in fields:
            raise UnknownNameError("config key", full, fields)
        sub = _dataclass_of(typing.get_type_hints(schema)[key])
        if sub is not None:
            _check_keys(value, sub, f"{full}.")


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (``Section`` or ``Optional[Section]``), else ``None``."""
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _merge(schema: type, data: Any, prefix: str = "") -> DictConfig:
    _check_keys(data, schema, prefix)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), data)
    except TypeError as e:  # e.g. a mapping where the schema has a list
        raise ConfigError(f"bad value under config key {prefix.rstrip('.') or 'config'!r}: {e}") from None
    except OmegaConfBaseException as e:
        key = f"{prefix}{e.full_key}" if getattr(e, "full_key", None) else prefix.rstrip(".") or "config"
        raise ConfigError(f"bad value for config key {key!r}: {first_line(e.msg)}") from None


def find_preset(name: str, config_dir: Path | None = None) -> Path:
    """A model preset by name or path: ``./models``, the config's ``../models``, the package's."""
    candidates = [Path(name)]
    roots = [Path.cwd(), *([config_dir, config_dir.parent] if config_dir else []), PACKAGE_ROOT]
    candidates += [root / "models" / f"{name}.yaml" for root in roots]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted({p.stem for root in roots for p in (root / "models").glob("*.yaml")})
    raise UnknownNameError("model preset", name, known)


def resolve_model(spec: Any, config_dir: Path | None = None) -> DictConfig:
    """Model section: a preset name, or a mapping with optional ``preset`` plus overriding keys."""
    if spec is None or spec == MISSING:
        raise ConfigError("config key 'model' is required (a preset name or a mapping with 'arch')")
    if isinstance(spec, str):
        spec = {"preset": spec}
    spec = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec)
    if "preset" in spec:
        preset = OmegaConf.to_container(_load_yaml(find_preset(spec.pop("preset"), config_dir)))
        spec = OmegaConf.to_container(OmegaConf.merge(preset, spec))
    arch = spec.get("arch", "transformer")
    if arch not in MODEL_SECTIONS:
        raise UnknownNameError("model arch", arch, MODEL_SECTIONS)
    model = _merge(MODEL_SECTIONS[arch], spec, "model.")
    if arch == "hf" and (model.family is None) == (model.path is None):
        raise ConfigError("an 'hf' model needs exactly one of 'family' (with 'config') or 'path'")
    return model


def _load_yaml(path: Path) -> DictConfig:
    try:
        data = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"cannot parse {path}: {first_line(e)}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at top level")
    return data


# sections a config may give as a name (``model: dense-tiny``, ``task: hierarchical_equality``): the mapping it
# stands for
_NAMED_BY = {"model": "preset", "task": "name"}


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """``key=value`` (dotted keys, list indices allowed; values parsed as YAML)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        top, _, rest = key.partition(".")
        if (
            rest and top in _NAMED_BY and isinstance(cfg.get(top), str)
        ):  # model=cbm-tiny model.lora=...: keep the preset
            OmegaConf.update(cfg, top, {_NAMED_BY[top]: cfg.get(top)}, merge=False, force_add=True)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 as text; a number in a file or an override is a float
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot apply override {item!r}: {first_line(e.msg)}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load, override, resolve the model preset and validate a config file."""
    path = Path(path)
    try:
        raw = _load_yaml(path)
        apply_overrides(raw, list(overrides))
        cfg = compose(raw, path.parent)
        from_env = _env_references(OmegaConf.to_container(cfg, resolve=False))
        OmegaConf.resolve(cfg)  # every interpolation now, so a bad one is a config error, not a crash mid-run
        for key, reference in from_env.items():  # read again when used; written as the reference, never the value
            OmegaConf.update(cfg, key, reference, merge=False)
        return cfg
    except OmegaConfBaseException as e:  # e.g. an interpolation that names no key, or names itself
        lines = str(e).splitlines()
        key = next((line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("full_key:")), None)
        raise ConfigError(
            f"config {path}: {lines[0] if lines else type(e).__name__}" + (f" (at '{key}')" if key else "")
        ) from None


def _env_references(node: Any, prefix: str = "") -> dict[str, str]:
    """``{dotted key: "${oc.env:VAR}"}`` for each value taken from the environment (a token, a
    password, a path): ``config.yaml`` and the wandb run keep these references, not the values."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    found: dict[str, str] = {}
    for key, value in items:
        if isinstance(value, str) and "oc.env:" in value:
            found[f"{prefix}{key}"] = value
        else:
            found |= _env_references(value, f"{prefix}{key}.")
    return found


def written(cfg: DictConfig) -> dict[str, Any]:
    """The config as it goes into ``config.yaml`` and the wandb run: resolved, except values read
    from the environment, which stay ``${oc.env:VAR}``."""
    return OmegaConf.to_container(cfg, resolve=False)


def compose(raw: DictConfig | dict, config_dir: Path | None = None) -> DictConfig:
    raw = raw if isinstance(raw, DictConfig) else OmegaConf.create(raw)
    model = resolve_model(raw.get("model"), config_dir)
    body = OmegaConf.to_container(raw)
    body.pop("model", None)
    cfg = _merge(ExperimentConfig, body)
    cfg.model = model
    if OmegaConf.is_missing(cfg, "task") or cfg.task is None:
        raise ConfigError("config key 'task' is required (a mapping with 'name')")
    if isinstance(cfg.task, str):
        cfg.task = {"name": cfg.task}
    for kind in ("objectives", "audits"):
        for i, entry in enumerate(cfg[kind]):
            if not isinstance(entry, (dict, DictConfig)) or "name" not in entry:
                raise ConfigError(f"config key '{kind}.{i}' must be a mapping with a 'name'")
    if cfg.logger.wandb.mode not in WANDB_MODES:
        raise UnknownNameError("logger.wandb.mode", cfg.logger.wandb.mode, WANDB_MODES)
    if cfg.trainer.on_nonfinite not in NONFINITE_POLICIES:
        raise UnknownNameError("trainer.on_nonfinite", cfg.trainer.on_nonfinite, NONFINITE_POLICIES)
    if cfg.optim.decay not in LR_DECAYS:
        raise UnknownNameError("optim.decay", cfg.optim.decay, LR_DECAYS)
    if cfg.loss.answer < 0:
        raise ConfigError(f"config key 'loss.answer' must be >= 0, got {cfg.loss.answer}")
    if cfg.loss.answer == 0 and not cfg.objectives:
        raise ConfigError("config key 'loss.answer' is 0 and there are no objectives: nothing to train")
    if cfg.optim.schedule_steps is not None and cfg.optim.schedule_steps < 1:
        raise ConfigError(f"config key 'optim.schedule_steps' must be >= 1, got {cfg.optim.schedule_steps}")
    for key in ("max_steps", "val_every", "log_every", "max_skipped_steps"):
        if cfg.trainer[key] < 1:
            raise ConfigError(f"config key 'trainer.{key}' must be >= 1, got {cfg.trainer[key]}")
    _check_numbers(cfg)
    return cfg


PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", "transformer-engine")


def _check_numbers(cfg: DictConfig) -> None:
    """Values the schema's types admit but training cannot use: one line naming the key."""
    for key in ("batch_size", "val_size", "val_batch_size"):
        if cfg.data[key] < 1:
            raise ConfigError(f"config key 'data.{key}' must be >= 1, got {cfg.data[key]}")
    optim = cfg.optim
    if not optim.lr >= 0:  # 0 is allowed: frozen weights, e.g. only bias balancing moves
        raise ConfigError(f"config key 'optim.lr' must be >= 0, got {optim.lr}")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {list(optim.betas)}")
    for key in ("weight_decay", "warmup_steps"):
        if optim[key] < 0:
            raise ConfigError(f"config key 'optim.{key}' must be >= 0, got {optim[key]}")
    devices = cfg.trainer.devices
    if (
        isinstance(devices, int)
        and devices < 1
        or isinstance(devices, str)
        and devices not in ("auto", "-1")
        and not devices.isdigit()
    ):
        raise ConfigError(f"config key 'trainer.devices' must be >= 1, 'auto' or a list of device ids, got {devices!r}")
    if isinstance(devices, str) and devices.isdigit() and int(devices) < 1:
        raise ConfigError(f"config key 'trainer.devices' must be >= 1, got {devices!r}")
    if cfg.trainer.on_nonfinite == "skip":
        t = cfg.trainer
        if not (str(devices) in ("1", "auto") and t.num_nodes == 1) or t.accumulate_grad_batches != 1:
            raise ConfigError(
                "trainer.on_nonfinite=skip needs one process and no gradient accumulation (Lightning cannot skip "
                f"a step in distributed training); got devices={devices}, num_nodes={t.num_nodes}, "
                f"accumulate_grad_batches={t.accumulate_grad_batches}"
            )
    if str(cfg.trainer.precision) not in PRECISIONS:
        raise UnknownNameError("trainer.precision", cfg.trainer.precision, PRECISIONS)
    if str(cfg.trainer.precision).startswith("16") and not _on_cuda(cfg.trainer.accelerator):
        raise ConfigError(
            f"config key 'trainer.precision' is {cfg.trainer.precision!r}: fp16 needs a CUDA device (this run is on "
            f"{cfg.trainer.accelerator!r}); on a CPU use bf16-mixed"
        )
    from lightning.pytorch.strategies import StrategyRegistry

    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if cfg.trainer.strategy not in strategies:
        raise UnknownNameError("trainer.strategy", cfg.trainer.strategy, strategies)
    accelerator = cfg.trainer.accelerator
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"config key 'trainer.accelerator' is {accelerator!r}, but this machine has no CUDA device"
            )


def _on_cuda(accelerator: str) -> bool:
    """Whether the run's accelerator is a CUDA device (``auto`` picks one when there is one)."""
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def to_plain(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)
