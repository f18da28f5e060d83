"""Shared by the text task's evidence tests (and the integration tests): rows with documents (one of
them gold) and rows with tool calls, each with a counterfactual."""

from __future__ import annotations

import random

THINGS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green", "leaf": "green", "sea": "blue"}
WORDS = "the color of is it says what ? and lookup calc none".split() + list(THINGS) + sorted(set(THINGS.values()))


def document_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Three one-fact documents, one of them about the asked thing (gold); the counterfactual
    gold document states another color."""
    rng = random.Random(seed)
    rows = []
    colors = sorted(set(THINGS.values()))
    for _ in range(n):
        things = rng.sample(list(THINGS), 3)
        asked = rng.randrange(3)
        new = rng.choice([c for c in colors if c != THINGS[things[asked]]])
        rows.append(
            {
                "documents": [f"{t} is {THINGS[t]}" for t in things],
                "gold_document": asked,
                "prompt": f"the color of {things[asked]} is",
                "answer": THINGS[things[asked]],
                "counterfactual": {"document": f"{things[asked]} is {new}", "answer": new},
            }
        )
    return rows


def tool_rows(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    colors = sorted(set(THINGS.values()))
    rows = []
    for _ in range(n):
        thing = rng.choice(list(THINGS))
        new = rng.choice([c for c in colors if c != THINGS[thing]])
        rows.append(
            {
                "prompt": f"what color is {thing} ?",
                "tool_calls": [
                    {
                        "tool": "lookup",
                        "arguments": thing,
                        "result": THINGS[thing],
                        "counterfactual_result": new,
                        "counterfactual_answer": f"{new} it says",
                    }
                ],
                "answer": f"{THINGS[thing]} it says",
            }
        )
    return rows
