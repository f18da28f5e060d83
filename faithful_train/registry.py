"""Names in configs -> classes: built-in tasks, objectives and audits, and users' own classes.

A config entry is ``{name: <name>, **arguments}``. ``<name>`` is a built-in name, or
``path/to/file.py:ClassName`` (relative to the working directory or the config's folder), or
``package.module:ClassName``. Arguments are checked against the class's constructor, so a
misspelt argument is an error that lists the valid ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from faithful_train.errors import ConfigError, FaithfulError, UnknownNameError


class Builtins(Mapping[str, str]):
    """Built-in classes by config name: ``{cls.name: "module:Class"}``. The name is written once,
    on the class (its ``name`` attribute), and read from there when the mapping is first used."""

    def __init__(self, kind: str, targets: tuple[str, ...]):
        self.kind, self.targets = kind, targets
        self._by_name: dict[str, str] | None = None

    def _names(self) -> dict[str, str]:
        if self._by_name is None:
            self._by_name = {load_target(t, self.kind, t, []).name: t for t in self.targets}
        return self._by_name

    def __getitem__(self, name: str) -> str:
        return self._names()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self.targets)


TASKS = Builtins(
    "task",
    (
        "faithful_train.tasks.hierarchical_equality:HierarchicalEquality",
        "faithful_train.tasks.multistep_arithmetic:MultiStepArithmetic",
        "faithful_train.tasks.domain_mixture:DomainMixture",
        "faithful_train.tasks.concept_objects:ConceptObjects",
        "faithful_train.tasks.decoy_objects:DecoyObjects",
        "faithful_train.tasks.text.task:TextTask",
        "faithful_train.tasks.kv_retrieval:KVRetrieval",
        "faithful_train.tasks.tool_use:ToolUse",
    ),
)
OBJECTIVES = Builtins(
    "objective",
    (
        "faithful_train.objectives.interchange:InterchangeObjective",
        "faithful_train.objectives.counterfactual_cot:CounterfactualCotObjective",
        "faithful_train.objectives.router:RouterObjective",
        "faithful_train.objectives.concepts:ConceptsObjective",
        "faithful_train.objectives.stability:StabilityObjective",
        "faithful_train.objectives.preserve:PreserveObjective",
        "faithful_train.objectives.circuit:CircuitObjective",
        "faithful_train.objectives.counterfactual_context:CounterfactualContextObjective",
        "faithful_train.objectives.sae:SaeObjective",
        "faithful_train.objectives.caft:CaftObjective",
        "faithful_train.objectives.tool_call:ToolCallObjective",
        "faithful_train.objectives.language_model:LanguageModelObjective",
    ),
)
AUDITS = Builtins(
    "audit",
    (
        "faithful_train.audits.interchange:InterchangeAudit",
        "faithful_train.audits.cot:CotAudit",
        "faithful_train.audits.router:RouterAudit",
        "faithful_train.audits.concepts:ConceptsAudit",
        "faithful_train.audits.attribution:AttributionAudit",
        "faithful_train.audits.patching:PatchingAudit",
        "faithful_train.audits.ablation:AblationAudit",
        "faithful_train.audits.edges:EdgesAudit",
        "faithful_train.audits.retrieval:RetrievalAudit",
        "faithful_train.audits.tools:ToolsAudit",
        "faithful_train.audits.sae:SaeAudit",
        "faithful_train.audits.graphs:GraphsAudit",
    ),
)


def _load_file(path: Path, attr: str, kind: str, name: str) -> Any:
    """``attr`` of the Python file ``path`` (its folder on the import path while it loads, so it
    can import modules beside it). Loading a file runs its code: only name files you trust."""
    module_name = f"faithful_train_user.{path.stem}_{abs(hash(path.resolve())) % 10**8}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            del sys.modules[module_name]
            raise ConfigError(f"{kind} {name!r}: {path} line {e.lineno}: {e.msg}") from None
        except Exception as e:
            del sys.modules[module_name]
            raise ConfigError(f"{kind} {name!r}: {path} fails to load: {type(e).__name__}: {e}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
    module = sys.modules[module_name]
    if not hasattr(module, attr):
        raise UnknownNameError(f"{kind} class in {path}", attr, [n for n in dir(module) if not n.startswith("_")])
    return getattr(module, attr)


def load_target(target: str, kind: str, name: str, roots: list[Path]) -> Any:
    """The attribute named by ``file.py:attr`` (the file relative to the working directory or one
    of ``roots``) or ``module:attr``."""
    where, attr = target.rsplit(":", 1)
    if where.endswith(".py"):
        path = next((root / where for root in [Path("."), *roots] if (root / where).is_file()), None)
        if path is None:
            raise ConfigError(f"{kind} {name!r}: file {where!r} not found")
        return _load_file(path, attr, kind, name)
    try:
        module = importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"{kind} {name!r}: cannot import {where!r} ({e})") from None
    if not hasattr(module, attr):
        raise UnknownNameError(f"{kind} class in {where}", attr, [n for n in dir(module) if not n.startswith("_")])
    return getattr(module, attr)


def resolve_class(
    kind: str, name: str, builtins: Mapping[str, str], base: type, config_dir: Path | None = None
) -> type:
    target = builtins.get(name, name)
    if ":" not in target:
        raise UnknownNameError(kind, name, [*builtins, "<file.py>:<Class>", "<module>:<Class>"])
    cls = load_target(target, kind, name, [config_dir] if config_dir else [])
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{kind} {name!r} must be a subclass of {base.__module__}.{base.__name__}")
    return cls


def constructor_arguments(cls: type) -> tuple[set[str], set[str]]:
    """(all accepted keyword arguments, required ones), following ``**kwargs`` up the MRO."""
    accepted, required = set(), set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                accepted.add(p.name)
                if p.default is p.empty:
                    required.add(p.name)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return accepted, required


def instantiate(
    kind: str, spec: Mapping[str, Any], builtins: Mapping[str, str], base: type, config_dir: Path | None = None
) -> Any:
    """Build ``spec['name']`` with the other keys as constructor arguments, checked."""
    spec = dict(spec)
    name = str(spec.pop("name"))
    cls = resolve_class(kind, name, builtins, base, config_dir)
    accepted, required = constructor_arguments(cls)
    for key in spec:
        if key not in accepted:
            raise UnknownNameError(f"argument of {kind} {name!r}", key, accepted)
    missing = sorted(required - set(spec))
    if missing:
        raise ConfigError(f"{kind} {name!r} needs argument(s): {', '.join(missing)}")
    try:
        return cls(**spec)
    except FaithfulError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{kind} {name!r}: {e}") from None


def load_callable(spec: str, kind: str, roots: list[Path]) -> Any:
    """A function named ``file.py:name`` (relative to one of ``roots``) or ``module:name``."""
    if ":" not in spec:
        raise ConfigError(f"{kind} {spec!r} must look like file.py:function or module:function")
    fn = load_target(spec, kind, spec, roots)
    if not callable(fn):
        raise ConfigError(f"{kind} {spec!r} is not a function")
    return fn
