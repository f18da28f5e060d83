"""Shared by the text task's tests (and the integration tests): a word-level tokenizer, colour
rows with spans, variables, concepts and counterfactual pairs, and a JSONL writer."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = "the color of apple banana sky grass is red yellow blue green very light dark and a an ' s".split()


def word_tokenizer(folder: Path, words=WORDS) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return folder


COLORS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green"}


def color_rows(n: int = 16) -> list[dict]:
    """``the color of X is`` -> its color; ``very`` answers take two tokens (``very <color>``)."""
    rows = []
    things = list(COLORS)
    for i in range(n):
        thing = things[i % 4]
        long = i % 3 == 0
        answer = f"very {COLORS[thing]}" if long else COLORS[thing]
        prompt = f"the color of {thing} is" if i % 2 else f"the color of the {thing} is"
        other = things[(i + 1) % 4]
        rows.append(
            {
                "prompt": prompt,
                "answer": answer,
                "variables": {"thing": thing},
                "spans": {"thing": thing, "color_word": [4, 9]},
                "concepts": {"kind": "fruit" if thing in ("apple", "banana") else "nature"},
                "paraphrase": f"{thing} ' s color is",
                "irrelevant": ["the"],
                "source": {"thing": (i + 1) % n},
                "counterfactual_answer": {
                    "thing": f"very {COLORS[things[(i + 1) % 4]]}" if long else COLORS[things[(i + 1) % 4]]
                },
            }
        )
        del other
    # the source row of each must have the same answer length: fix sources to the next row of the same length class
    for i, row in enumerate(rows):
        j = next(
            k
            for k in list(range(i + 1, n)) + list(range(i))
            if (k % 3 == 0) == (i % 3 == 0) and rows[k]["variables"]["thing"] != row["variables"]["thing"]
        )
        row["source"]["thing"] = j
        row["counterfactual_answer"]["thing"] = rows[j]["answer"]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
