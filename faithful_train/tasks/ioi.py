"""An offline, seeded IOI (indirect object identification, Wang et al. 2022) text dataset.

Each row is a sentence such as ``When Mary and John went to the store , John gave a drink to``
whose answer is the indirect object (``Mary``). Two names appear: the indirect object IO and the
subject S, which is mentioned twice (S1, S2). Order ``ABBA`` is ``IO .. S .. S``; ``BABA`` is
``S .. IO .. S``; each row draws its order at random, so the split is about half and half.
Punctuation is written as separate space-separated words, so every word is one token of the
word-level tokenizer and character spans are simple.

``write_ioi(out, seed)`` writes into ``out``:

- ``train.jsonl``, ``val.jsonl``, ``audit.jsonl``: one row per line. The name list is split (seeded)
  into train names (75%) and held-out names; train and val use only train names, audit uses only
  held-out names (IO and S both).
- ``text.txt``: full sentences (``prompt + " " + answer``), one per line, for held-out perplexity;
  each line draws its names either from the val (train-name) pool or from the audit pool.
- ``corpus.txt``: pretraining text for the language-model loss (``task.lm_text``): IOI sentences and
  plain sentences over every name, held-out ones too, as a pretrained model has seen every name;
  the task files (what the objectives fine-tune on) hold the audit's names out.
- ``tokenizer/``: a ``WordLevel`` tokenizer (``[PAD]``, ``[UNK]``, then every word that can occur,
  sorted) with the ``Whitespace`` pre-tokenizer, saved as a ``PreTrainedTokenizerFast``.

Row schema (nested JSON objects)::

    prompt                   the sentence without its answer; its last word is "to"
    answer                   the IO name (one word, one token)
    foil                     the S name, the competing answer (``val/logit_diff``: IO against S)
    variables.IO / .S        the two names; variables.order is "ABBA" or "BABA"
    spans.IO / .S1 / .S2     [start, end) character spans in prompt of IO and both S mentions
    spans.end                the span of the prompt's last word
    template                 int template id (index into TEMPLATES)
    source.IO                index (same file, never itself) of a row whose IO is neither this row's IO
                             nor its S, and whose S is not this row's IO;
                             counterfactual_answer.IO is that row's IO
    source.S                 index of a row with the roles swapped (its IO is this S, its S is this IO),
                             with a different template when one exists;
                             counterfactual_answer.S is this row's S

Rows are generated in role-swapped pairs (plus one triple when the count is odd), so every row
has an S partner; the file is then shuffled and source indices are chosen on the shuffled rows.
Every draw comes from ``random.Random(seed)``; the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from faithful_train.io.files import atomic_write_text
from faithful_train.tasks.text.files import save_tokenizer

TEMPLATES = [
    "When {A} and {B} went to the {PLACE} , {C} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE} , {C} gave a {OBJECT} to",
    "Then , {A} and {B} had a long argument . Afterwards {C} said to",
    "After {A} and {B} went to the {PLACE} , {C} handed a {OBJECT} to",
    "Then , {A} and {B} went to the {PLACE} . {C} gave a {OBJECT} to",
    "When {A} and {B} arrived at the {PLACE} , {C} threw a {OBJECT} to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE} . {C} gave it to",
    "When {A} and {B} got a {OBJECT} at the {PLACE} , {C} decided to give it to",
    "Afterwards , {A} and {B} went to the {PLACE} . {C} brought a {OBJECT} to",
    "While spending time at the {PLACE} , {A} and {B} found a {OBJECT} . {C} passed it to",
]
NAMES = [
    "Mary", "John", "Alice", "Bob", "Tom", "Sarah", "James", "Emma", "David", "Laura",
    "Michael", "Anna", "Daniel", "Kate", "Paul", "Lisa", "Mark", "Julia", "Peter", "Rachel",
    "Steven", "Helen", "Brian", "Grace", "Kevin", "Amy", "Jason", "Megan", "Eric", "Claire",
    "Adam", "Diana", "Frank", "Nora", "George", "Olivia", "Henry", "Rose", "Ivan", "Sophie",
    "Jack", "Lucy", "Oscar", "Ruth", "Victor", "Wendy", "Simon", "Hannah",
]  # fmt: skip
# more names than a small model's width: a copying circuit that works for every train name must
# then be close to the identity on the name embeddings, which carries it over to held-out names
NAMES += [
    a + b
    for a in ("Ka", "Lo", "Mi", "Ra", "Te", "Vo", "Su", "Ne", "Di", "Bo", "Fa", "Zu")
    for b in ("ren", "la", "mo", "tis", "van", "del", "ria", "son", "bek")
]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "library"]
OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book", "bottle"]
# plain sentences for the language-model corpus: every name (held-out ones too) in contexts that are
# not IOI, so each name's embedding and unembedding are trained while IOI is learned on train names
CORPUS_TEMPLATES = [
    "{N} went to the {PLACE} .",
    "{N} has a {OBJECT} .",
    "The {OBJECT} is at the {PLACE} with {N} .",
    "At the {PLACE} , {N} found a {OBJECT} .",
    "Then , {N} said to {M} .",
    "{N} and {M} went to the {PLACE} .",
    "A {OBJECT} was given to {N} .",
]
SPECIALS = ["[PAD]", "[UNK]"]
TRAIN_NAME_FRACTION = 0.75
_WORD = re.compile(r"\w+|[^\w\s]+")  # what tokenizers' Whitespace pre-tokenizer splits out


def split_names(rng: random.Random) -> tuple[list[str], list[str]]:
    """The name list shuffled and cut into (train names, held-out names)."""
    names = list(NAMES)
    rng.shuffle(names)
    k = round(TRAIN_NAME_FRACTION * len(names))
    return names[:k], names[k:]


def make_row(rng: random.Random, io: str, s: str) -> dict[str, Any]:
    """One row with names ``io``/``s`` and a random template, place, object and order."""
    template = rng.randrange(len(TEMPLATES))
    order = "ABBA" if rng.random() < 0.5 else "BABA"
    fill = {"{PLACE}": rng.choice(PLACES), "{OBJECT}": rng.choice(OBJECTS), "{C}": s}
    fill.update({"{A}": io, "{B}": s} if order == "ABBA" else {"{A}": s, "{B}": io})
    words, slots, at = [], {}, 0
    for word in TEMPLATES[template].split(" "):
        word = fill.get(word, word)
        slots.setdefault(word, []).append([at, at + len(word)])  # names and words by position
        words.append(word)
        at += len(word) + 1
    prompt = " ".join(words)
    s1, s2 = slots[s]
    return {
        "prompt": prompt,
        "answer": io,
        "foil": s,
        "variables": {"IO": io, "S": s, "order": order},
        "spans": {"IO": slots[io][0], "S1": s1, "S2": s2, "end": [len(prompt) - len(words[-1]), len(prompt)]},
        "template": template,
    }


def _pick(rng: random.Random, n: int, ok) -> int:
    """A random index in ``range(n)`` with ``ok(index)``: a few random tries, then a full scan."""
    for _ in range(64):
        j = rng.randrange(n)
        if ok(j):
            return j
    candidates = [j for j in range(n) if ok(j)]
    if not candidates:
        raise ValueError("no valid counterfactual source row; use more rows")
    return rng.choice(candidates)


def make_split(rng: random.Random, names: list[str], n: int) -> list[dict[str, Any]]:
    """``n`` rows in role-swapped pairs, shuffled, with counterfactual sources filled in."""
    if n == 1:
        raise ValueError("a split needs 0 or at least 2 rows (every row has a role-swapped partner)")
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        io, s = rng.sample(names, 2)
        rows += [make_row(rng, io, s), make_row(rng, s, io)]
        if n - len(rows) == 1:  # odd count: a triple, whose third row's partner is the second
            rows.append(make_row(rng, io, s))
    rng.shuffle(rows)
    by_pair: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        by_pair.setdefault((row["variables"]["IO"], row["variables"]["S"]), []).append(i)
    for _i, row in enumerate(rows):
        io, s = row["variables"]["IO"], row["variables"]["S"]
        j = _pick(
            rng, n, lambda j, io=io, s=s: rows[j]["variables"]["IO"] not in (io, s) and rows[j]["variables"]["S"] != io
        )
        swapped = by_pair[(s, io)]
        other_template = [k for k in swapped if rows[k]["template"] != row["template"]]
        k = rng.choice(other_template or swapped)
        row["source"] = {"IO": j, "S": k}
        row["counterfactual_answer"] = {"IO": rows[j]["variables"]["IO"], "S": s}
    return rows


def vocabulary() -> list[str]:
    """Every word that can occur in a prompt or answer: specials first, then sorted words."""
    words = {w for t in TEMPLATES + CORPUS_TEMPLATES for w in t.split(" ") if not w.startswith("{")}
    words |= set(NAMES) | set(PLACES) | set(OBJECTS)
    assert all(_WORD.fullmatch(w) for w in words), "every word must be a single pre-token"
    return SPECIALS + sorted(words)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def corpus_line(rng: random.Random, names: list[str]) -> str:
    """One line of the language-model corpus: half IOI sentences with their answer, half plain
    sentences, over every name (what pretraining text holds; the task files hold out names)."""
    if rng.random() < 0.5:
        row = make_row(rng, *rng.sample(names, 2))
        return f"{row['prompt']} {row['answer']}"
    template = rng.choice(CORPUS_TEMPLATES)
    n, m = rng.sample(names, 2)
    fill = {"{N}": n, "{M}": m, "{PLACE}": rng.choice(PLACES), "{OBJECT}": rng.choice(OBJECTS)}
    return " ".join(fill.get(w, w) for w in template.split(" "))


def write_ioi(
    out: str | Path,
    seed: int = 0,
    n_train: int = 20000,
    n_val: int = 1000,
    n_audit: int = 1000,
    n_text: int = 2000,
    n_corpus: int = 20000,
) -> dict[str, Path]:
    """Write the IOI splits, ``text.txt`` and the tokenizer into ``out``; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_names, held_out = split_names(rng)
    # one sub-seed per part, drawn in a fixed order: a part's rows do not depend on other parts' sizes
    sub = {part: random.Random(rng.getrandbits(64)) for part in ("train", "val", "audit", "text")}
    splits = {
        "train": make_split(sub["train"], train_names, n_train),
        "val": make_split(sub["val"], train_names, n_val),
        "audit": make_split(sub["audit"], held_out, n_audit),
    }
    paths: dict[str, Path] = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.jsonl"
        atomic_write_text(paths[name], _jsonl(rows))
    r = sub["text"]
    lines = []
    for _ in range(n_text):
        row = make_row(r, *r.sample(train_names if r.random() < 0.5 else held_out, 2))
        lines.append(f"{row['prompt']} {row['answer']}\n")
    paths["text"] = out / "text.txt"
    atomic_write_text(paths["text"], "".join(lines))
    corpus_rng = random.Random(rng.getrandbits(64))  # drawn last: the other parts are as before
    paths["corpus"] = out / "corpus.txt"
    atomic_write_text(paths["corpus"], "".join(corpus_line(corpus_rng, NAMES) + "\n" for _ in range(n_corpus)))
    paths["tokenizer"] = save_tokenizer(build_tokenizer(), out)
    return paths
