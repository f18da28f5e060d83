import pytest

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.registry import TASKS, instantiate
from faithful_train.tasks.base import Task
from faithful_train.training.config import compose, load_config


def test_quickstart_config_composes_preset_and_overrides(repo, monkeypatch):
    monkeypatch.chdir(repo)
    cfg = load_config("configs/quickstart.yaml", ["model.d_model=128", "objectives.0.weight=0.5", "model=moe-tiny"])
    assert cfg.model.arch == "transformer" and cfg.model.n_experts == 4  # the preset was swapped first
    assert cfg.objectives[0].weight == 0.5
    assert cfg.objectives[0].alignment == cfg.audits[0].alignment  # YAML anchor
    assert cfg.trainer.max_steps == 5000 and cfg.logger.wandb.mode == "offline"


def test_every_config_and_preset_starts_with_its_command(repo):
    for path in [*repo.glob("configs/*.yaml"), *repo.glob("models/*.yaml")]:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# faithful-train fit -c configs/") or first.startswith("# model preset"), path
        if path.parent.name == "configs":
            assert first == f"# faithful-train fit -c configs/{path.name}"
            load_config(path)


def test_inline_model_and_errors():
    base = {"task": "hierarchical_equality", "model": {"arch": "transformer", "d_model": 32}}
    assert compose(base).task.name == "hierarchical_equality"
    with pytest.raises(UnknownNameError, match="unknown config key 'model.width'; valid: .*d_model"):
        compose({**base, "model": {"arch": "transformer", "width": 3}})
    with pytest.raises(UnknownNameError, match="model arch 'rnn'"):
        compose({**base, "model": {"arch": "rnn"}})
    with pytest.raises(ConfigError, match="exactly one of 'family'"):
        compose({**base, "model": {"arch": "hf"}})
    with pytest.raises(ConfigError, match="'task' is required"):
        compose({"model": base["model"]})
    with pytest.raises(ConfigError, match="objectives.0"):
        compose({**base, "objectives": ["interchange"]})
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        compose({**base, "trainer": {"max_steps": 0}})


def test_task_arguments_are_checked():
    with pytest.raises(UnknownNameError, match="'n_symbol'; valid: equal_rate, n_symbols"):
        instantiate("task", {"name": "hierarchical_equality", "n_symbol": 3}, TASKS, Task)
    with pytest.raises(ConfigError, match="n_symbols must be >= 2"):
        instantiate("task", {"name": "hierarchical_equality", "n_symbols": 1}, TASKS, Task)
    with pytest.raises(ConfigError, match="equal_rate must be in"):
        instantiate("task", {"name": "hierarchical_equality", "equal_rate": 1.0}, TASKS, Task)
    with pytest.raises(ConfigError, match="not found"):
        instantiate("task", {"name": "missing.py:Task"}, TASKS, Task)
    with pytest.raises(ConfigError, match="subclass"):
        instantiate("task", {"name": "collections:OrderedDict"}, TASKS, Task)


def test_user_task_from_a_file(tmp_path, repo):
    task = instantiate("task", {"name": "halves_task.py:HalvesTask"}, TASKS, Task, repo / "tests/integration/assets")
    assert task.variables == ("low", "even")
    with pytest.raises(UnknownNameError, match="HalvesTask"):
        instantiate("task", {"name": "halves_task.py:Halves"}, TASKS, Task, repo / "tests/integration/assets")


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")


def test_interpolations_resolve_when_loaded(repo, monkeypatch):
    monkeypatch.chdir(repo)
    cfg = load_config("configs/quickstart.yaml", ["trainer.max_steps=40", "trainer.val_every=${trainer.max_steps}"])
    assert cfg.trainer.val_every == 40
    with pytest.raises(ConfigError, match=r"RecursionError.*at 'audits'"):  # resolved now, not mid-run
        load_config("configs/quickstart.yaml", ["audits=[${audits.0}]"])


def test_lr_schedule():
    from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
    from faithful_train.training.module import FaithfulModule
    from tests.conftest import tiny_transformer

    task = HierarchicalEquality()
    from faithful_train.training.config import OptimSection

    optim = OptimSection(warmup_steps=10, decay="cosine", schedule_steps=110, min_lr_ratio=0.1)
    module = FaithfulModule(tiny_transformer(task.vocab_size), task, optim)
    assert module.lr_factor(0) == pytest.approx(0.1) and module.lr_factor(9) == pytest.approx(1.0)
    assert module.lr_factor(60) == pytest.approx(0.55) and module.lr_factor(110) == pytest.approx(0.1)
    with pytest.raises(UnknownNameError, match="optim.decay"):
        compose({"task": "hierarchical_equality", "model": {"arch": "transformer"}, "optim": {"decay": "step"}})
