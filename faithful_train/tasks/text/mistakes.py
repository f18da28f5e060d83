"""Counterfactual rationales from a ``label_fn``: a mistake written into one step, the answer the
mistaken rationale implies given by the user's function (Lanham et al. 2023, "adding mistakes").

For rows with ``steps`` but no ``counterfactual.*`` columns, when the task has a ``label_fn``,
each row gets one (seeded by the row's index, so every load is the same):

1. a step ``j``, uniform over the steps that hold a number;
2. that step's *result*, its last number, replaced by another with as many tokens (the nearest
   values first, in a seeded order), so the counterfactual rationale can be teacher-forced in
   place of the original;
3. ``label_fn(row)`` on the row with that step changed (``steps``; ``counterfactual.step`` = j;
   ``answer`` still the original): either the answer the mistaken rationale implies (the later
   steps stay as written), or ``{"steps": [...], "answer": "..."}``, the rationale continued from
   the mistake (as many steps, each as many tokens) and its answer.

A wrong value that leaves the implied answer unchanged is passed over for the next; if none
changes it, the row keeps the last one (its ``follow`` and ``original`` answers are then the same).
The columns written are those a file could carry, so everything downstream (the ``cot`` audit's
``follow_rate``, the ``counterfactual_cot`` objective) reads them as it reads a file's.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

from faithful_train.errors import DataError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
CANDIDATES = 20  # wrong values tried per row


def with_mistakes(
    rows: list[dict[str, Any]], label_fn: Callable[[dict[str, Any]], Any], tokenizer: Any, where: str
) -> list[dict[str, Any]]:
    """``rows`` with ``counterfactual.step``, ``counterfactual.steps`` and ``counterfactual.answer``
    filled from a mistake in one step and ``label_fn``; rows that already have them are kept."""
    out = []
    for r, row in enumerate(rows):
        if "counterfactual.steps" in row or not isinstance(row.get("steps"), list):
            out.append(row)
            continue
        out.append(row | _mistaken(row, r, label_fn, tokenizer, f"{where} row {r}"))
    return out


def _mistaken(
    row: dict[str, Any], index: int, label_fn: Callable[[dict[str, Any]], Any], tokenizer: Any, where: str
) -> dict[str, Any]:
    steps = [str(s) for s in row["steps"]]
    rng = random.Random(index)
    numbered = [j for j, s in enumerate(steps) if NUMBER.search(s)]
    if not numbered:
        raise DataError(f"{where} column 'steps': no number in any step for label_fn's mistake to change")
    j = rng.choice(numbered)
    result = list(NUMBER.finditer(steps[j]))[-1]
    length = len(tokenizer(steps[j])["input_ids"])
    found: dict[str, Any] | None = None
    for value in _wrong_values(result.group(), rng):
        changed = steps[j][: result.start()] + value + steps[j][result.end() :]
        if len(tokenizer(changed)["input_ids"]) != length:
            continue
        mistaken = steps[:j] + [changed] + steps[j + 1 :]
        found = _labelled(row, j, mistaken, label_fn, where)
        if found["counterfactual.answer"] != str(row["answer"]).strip():
            return found
    if found is None:
        raise DataError(f"{where} column 'steps': no other value for {result.group()!r} in step {j} has as many tokens")
    return found


def _wrong_values(value: str, rng: random.Random) -> list[str]:
    """Other numbers near ``value``, nearest first (ties in a seeded order), as text."""
    decimals = len(value.split(".")[1]) if "." in value else 0
    unit = 10.0**-decimals
    number = float(value)
    offsets = [d for k in range(1, CANDIDATES // 2 + 1) for d in rng.sample([k, -k], 2)]
    values = [number + d * unit for d in offsets]
    if not value.startswith("-"):
        values = [v for v in values if v >= 0]
    return [f"{v:.{decimals}f}" for v in values]


def _labelled(
    row: dict[str, Any], j: int, mistaken: list[str], label_fn: Callable[[dict[str, Any]], Any], where: str
) -> dict[str, Any]:
    try:
        given = label_fn(row | {"steps": mistaken, "counterfactual.step": j})
    except Exception as e:  # the user's function: name the row it failed on
        raise DataError(f"{where}: label_fn failed on the rationale with step {j} changed: {e}") from None
    if isinstance(given, dict):
        steps, answer = given.get("steps"), given.get("answer")
        if not isinstance(steps, list) or len(steps) != len(mistaken) or answer is None:
            raise DataError(
                f"{where}: label_fn must return the answer, or {{'steps': [{len(mistaken)} steps], 'answer': ...}}, "
                f"got {given!r}"
            )
        mistaken, given = [str(s) for s in steps], answer
    return {"counterfactual.step": j, "counterfactual.steps": mistaken, "counterfactual.answer": str(given).strip()}
