"""Pareto fronts, hypervolume and multi-objective pruning: pure functions on figure vectors.

Every function takes points ``(n, m)`` already oriented so that **larger is better** in each of
the ``m`` figures (``orient`` flips the figures to minimise), so dominance is one comparison:
``a`` dominates ``b`` when ``a >= b`` everywhere and ``a > b`` somewhere (Deb et al. 2002).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIRECTIONS = ("maximize", "minimize")


def orient(values: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """``(n, m)`` values with each ``minimize`` figure negated: larger is better everywhere."""
    sign = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    return np.asarray(values, dtype=float).reshape(-1, len(directions)) * sign


def dominates(a: np.ndarray, b: np.ndarray, margin: float | np.ndarray = 0.0) -> bool:
    """Whether ``a`` dominates ``b`` by ``margin``: no worse in any figure (``a >= b``) and
    better by more than ``margin`` in one (``margin`` 0: plain Pareto dominance). A margin in
    one figure, not in all, lets a saturated figure (accuracy 1.0 for both) tie."""
    return bool(np.all(a >= b) and np.any(a > b + margin))


def front_mask(points: np.ndarray) -> np.ndarray:
    """``(n,)`` True for the points no other point dominates (the Pareto front; ties all kept)."""
    points = np.asarray(points, dtype=float)
    n = len(points)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if i != j and dominates(points[j], points[i]):
                keep[i] = False
                break
    return keep


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by ``points`` and dominating ``reference`` (larger is better), by
    slicing along the first figure (exact; fine for the tens of points a sweep has). Points
    that do not beat the reference in every figure add nothing."""
    points = np.asarray(points, dtype=float)
    reference = np.asarray(reference, dtype=float)
    points = points[np.all(points > reference, axis=1)]
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(points[:, 0].max() - reference[0])
    points = points[front_mask(points)]
    order = np.argsort(-points[:, 0])
    points = points[order]
    volume = 0.0
    for i, level in enumerate(points[:, 0]):
        lower = points[i + 1, 0] if i + 1 < len(points) else reference[0]
        if level > lower:  # the slab between this level and the next holds points 0..i
            volume += (level - lower) * hypervolume(points[: i + 1, 1:], reference[1:])
    return float(volume)


def should_prune(trial: np.ndarray, others: np.ndarray, margin: float | np.ndarray) -> bool:
    """Whether a running trial's figures at step ``s`` are dominated, by ``margin``, by a member
    of the front of the finished trials' figures at the same step (``others`` ``(n, m)``): some
    finished trial was no worse in every figure at that step and better by more than
    ``margin`` in one.

    Optuna prunes one objective against the median or a percentile; for several objectives it
    has no pruner (Optuna issues 3450, 5268). Comparing with the front at the same step keeps
    any trial that might still join the front, within the margin."""
    others = np.asarray(others, dtype=float).reshape(-1, len(trial))
    if len(others) == 0:
        return False
    front = others[front_mask(others)]
    return any(dominates(member, trial, margin) for member in front)
