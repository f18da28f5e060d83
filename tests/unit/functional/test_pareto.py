"""Pareto fronts, hypervolume (against Optuna's own) and the multi-objective pruning rule."""

import numpy as np
import pytest

from faithful_train.functional.pareto import dominates, front_mask, hypervolume, orient, should_prune


def test_orientation_and_dominance():
    points = orient([[0.9, 0.2], [0.8, 0.1]], ["maximize", "minimize"])
    assert points.tolist() == [[0.9, -0.2], [0.8, -0.1]]
    assert dominates(np.array([1.0, 1.0]), np.array([1.0, 0.5]))
    assert not dominates(np.array([1.0, 1.0]), np.array([1.0, 1.0]))  # ties do not dominate
    assert not dominates(np.array([1.0, 0.55]), np.array([1.0, 0.5]), margin=0.1)  # within the margin
    assert dominates(np.array([1.0, 0.75]), np.array([1.0, 0.5]), margin=0.1)  # a saturated figure may tie


def test_front_keeps_ties_and_drops_dominated():
    points = np.array([[1.0, 0.5], [0.8, 0.9], [0.8, 0.9], [0.7, 0.4], [1.0, 0.2]])
    assert front_mask(points).tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("dims", [2, 3])
def test_hypervolume_matches_optuna(dims):
    from optuna._hypervolume import compute_hypervolume

    rng = np.random.default_rng(dims)
    for _ in range(5):
        points = rng.random((12, dims))
        reference = np.zeros(dims)
        ours = hypervolume(points, reference)
        theirs = compute_hypervolume(-points[front_mask(points)], -reference)  # Optuna minimises
        assert ours == pytest.approx(theirs, rel=1e-9)
    assert hypervolume(np.array([[0.5, 0.5]]), np.array([0.5, 0.0])) == 0.0  # not beyond the reference
    assert hypervolume(np.array([[1.0, 2.0], [2.0, 1.0]]), np.zeros(2)) == pytest.approx(3.0)


def test_pruning_against_the_front_at_the_same_step():
    finished = np.array([[1.0, 0.6], [0.8, 0.8]])
    assert should_prune(np.array([0.5, 0.5]), finished, margin=0.05)
    assert not should_prune(np.array([0.9, 0.7]), finished, margin=0.05)  # on no one's dominated side
    assert not should_prune(np.array([1.0, 0.58]), finished, margin=0.05)  # within the margin
    assert not should_prune(np.array([0.1, 0.1]), np.zeros((0, 2)), margin=0.0)  # nothing finished
