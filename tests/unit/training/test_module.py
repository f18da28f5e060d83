"""The FaithfulModule (``faithful_train/training/module.py``) owns its objectives' modules: in its
state_dict and its optimizer."""

from faithful_train.objectives.interchange import InterchangeObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.training.config import OptimSection
from faithful_train.training.module import FaithfulModule
from tests.conftest import tiny_transformer
from tests.unit.equality_cases import DAS


def test_faithful_module_owns_objective_parameters():
    """The basis is in the module's state_dict (checkpoints) and optimizer (no weight decay)."""
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(DAS, subspace="learned", label="das")
    objective.bind(model, task)
    module = FaithfulModule(model, task, OptimSection(weight_decay=0.1), objective_modules={"das": objective.module()})
    assert any(k.startswith("objective_modules.das.") for k in module.state_dict())
    optimizer = module.configure_optimizers()
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in no_decay for p in objective.module().parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
