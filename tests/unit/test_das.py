"""Learned (DAS) and random orthonormal bases, and the learned-subspace interchange objective:
gradient paths, the model-frozen DAS search, and ownership by the FaithfulModule."""

import pytest
import torch

from faithful_train.das import OrthonormalBasis, SiteBases, random_basis, rotated_sites, variable_bases
from faithful_train.errors import ConfigError
from faithful_train.module import FaithfulModule
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.interchange import InterchangeObjective
from faithful_train.sites import SiteRef, run_with
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer

DAS = {
    "left": {"site": "blocks.0.resid_post", "positions": [3], "dims": [0, 4]},
    "right": {"site": "blocks.0.resid_post", "positions": [3], "dims": [4, 8]},
}


def test_random_basis_is_orthonormal_and_seeded():
    q = random_basis(16, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q.T @ q, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.equal(q, random_basis(16, 5, torch.Generator().manual_seed(0)))


def test_learned_basis_stays_orthonormal_under_training():
    basis = OrthonormalBasis(16, 6, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(basis.parameters(), lr=0.1)
    target = torch.randn(16, 6)
    for _ in range(20):
        loss = (basis.basis - target).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    b = basis.basis.detach()
    torch.testing.assert_close(b.T @ b, torch.eye(6), atol=1e-5, rtol=0)


def test_variables_at_one_site_take_disjoint_columns_of_one_basis():
    alignment = {v: SiteRef.parse(s) for v, s in DAS.items()}
    assert rotated_sites(alignment) == {"blocks.0.resid_post": 8}
    bases = SiteBases({"blocks.0.resid_post": 8}, {"blocks.0.resid_post": 32})
    per_var = variable_bases(alignment, bases())
    assert per_var["left"].shape == (32, 4)
    torch.testing.assert_close(per_var["left"].T @ per_var["right"], torch.zeros(4, 4), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="dims"):
        rotated_sites({"left": SiteRef("blocks.0.resid_post")})


def _term(objective, model, task, batch):
    logits, cache = run_with(model, batch["input_ids"], record=objective.sites())
    ctx = StepContext(batch, logits, cache, model, task, 0, torch.Generator().manual_seed(0))
    return objective.term(ctx)


def _grad_norm(params):
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


@pytest.mark.parametrize("resume", [True, False])
def test_learned_subspace_gradient_reaches_basis_and_upstream_layers(resume):
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(DAS, subspace="learned", resume=resume)
    objective.bind(model, task)
    assert (objective.plan is not None) == resume
    _term(objective, model, task, task.sample(16, 0)).backward()
    assert _grad_norm(objective.module().parameters()) > 0
    assert _grad_norm(model.blocks[0].parameters()) > 0  # upstream of the patched site
    assert _grad_norm(model.tok_emb.parameters()) > 0
    assert _grad_norm(model.blocks[1].parameters()) > 0


def test_update_model_false_trains_only_the_basis():
    """A DAS search beside training: the term's gradient reaches the basis, never the model."""
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(DAS, subspace="learned", update_model=False)
    objective.bind(model, task)
    _term(objective, model, task, task.sample(16, 0)).backward()
    assert _grad_norm(objective.module().parameters()) > 0
    assert _grad_norm(model.parameters()) == 0


def test_learned_and_fixed_terms_agree_when_the_basis_is_the_standard_one():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    batch = task.sample(16, 0)
    learned = InterchangeObjective(DAS, subspace="learned")
    learned.bind(model, task)
    with torch.no_grad():  # basis = the first 8 standard directions
        learned.bases.bases[0].map.weight = torch.eye(32)[:8]
    fixed = InterchangeObjective(DAS)
    fixed.bind(model, task)
    torch.testing.assert_close(_term(learned, model, task, batch), _term(fixed, model, task, batch), atol=1e-5, rtol=0)


def test_faithful_module_owns_objective_parameters():
    """The basis is in the module's state_dict (checkpoints) and optimizer (no weight decay)."""
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(DAS, subspace="learned", label="das")
    objective.bind(model, task)
    module = FaithfulModule(model, task, weight_decay=0.1, objective_modules={"das": objective.module()})
    assert any(k.startswith("objective_modules.das.") for k in module.state_dict())
    optimizer = module.configure_optimizers()
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in no_decay for p in objective.module().parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
