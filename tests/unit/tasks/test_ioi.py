import json

import pytest

from faithful_train.tasks.ioi import NAMES, TEMPLATES, write_ioi

SIZES = dict(n_train=200, n_val=50, n_audit=51, n_text=20, n_corpus=30)  # odd audit size: the triple path
FILES = ["train.jsonl", "val.jsonl", "audit.jsonl", "text.txt", "corpus.txt"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ioi")
    return out, write_ioi(out, seed=0, **SIZES)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_files_and_determinism(data, tmp_path):
    out, paths = data
    assert set(paths) == {"train", "val", "audit", "text", "corpus", "tokenizer"}
    assert all(p.exists() for p in paths.values()) and paths["tokenizer"].is_dir()
    assert [len(read(out / f)) for f in FILES[:3]] == [200, 50, 51]
    assert len((out / "text.txt").read_text().splitlines()) == 20
    corpus = (out / "corpus.txt").read_text().splitlines()
    assert len(corpus) == 30 and all(any(name in line.split() for name in NAMES) for line in corpus)
    again = write_ioi(tmp_path / "again", seed=0, **SIZES)
    assert all_bytes(out) == all_bytes(again["train"].parent)
    other = write_ioi(tmp_path / "other", seed=1, **SIZES)
    for f in FILES:
        assert (out / f).read_bytes() != (other["train"].parent / f).read_bytes()
    assert not list(out.glob(".*")), "no temporary files left behind"


@pytest.mark.parametrize("split", ["train", "val", "audit"])
def test_rows(data, split):
    _, paths = data
    rows = read(paths[split])
    keys = {"prompt", "answer", "foil", "variables", "spans", "template", "source", "counterfactual_answer"}
    orders = set()
    for i, row in enumerate(rows):
        assert set(row) == keys
        p, v, sp = row["prompt"], row["variables"], row["spans"]
        io, s = v["IO"], v["S"]
        assert row["foil"] == s
        assert row["answer"] == io and io != s and io in NAMES and s in NAMES
        assert 0 <= row["template"] < len(TEMPLATES)
        assert p.split(" ")[-1] == "to" and p[slice(*sp["end"])] == "to" and sp["end"][1] == len(p)
        assert p[slice(*sp["IO"])] == io and p[slice(*sp["S1"])] == s and p[slice(*sp["S2"])] == s
        assert sp["S1"][0] < sp["S2"][0] and sp["IO"][0] < sp["S2"][0]
        assert v["order"] == ("ABBA" if sp["IO"][0] < sp["S1"][0] else "BABA")
        orders.add(v["order"])
        src, cf = row["source"], row["counterfactual_answer"]
        assert all(isinstance(src[k], int) and 0 <= src[k] < len(rows) and src[k] != i for k in ("IO", "S"))
        by_io = rows[src["IO"]]["variables"]
        assert cf["IO"] == by_io["IO"] and by_io["IO"] not in (io, s) and by_io["S"] != io
        by_s = rows[src["S"]]["variables"]
        assert by_s["IO"] == s and by_s["S"] == io and cf["S"] == s
    assert orders == {"ABBA", "BABA"}


def test_audit_names_held_out(data):
    _, paths = data
    names = {k: {r["variables"][v] for r in read(paths[k]) for v in ("IO", "S")} for k in ("train", "val", "audit")}
    assert names["audit"] and not names["audit"] & (names["train"] | names["val"])
    text_words = {w for line in paths["text"].read_text().splitlines() for w in line.split(" ")}
    assert text_words & set(NAMES)


def test_tokenizer(data):
    transformers = pytest.importorskip("transformers")
    _, paths = data
    tok = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert tok.is_fast and tok.pad_token == "[PAD]" and tok.unk_token == "[UNK]"
    lines = paths["text"].read_text().splitlines()
    assert all(tok.unk_token_id not in tok(line)["input_ids"] for line in lines)
    for split in ("train", "val", "audit"):
        for row in read(paths[split]):
            enc = tok(row["prompt"], return_offsets_mapping=True, add_special_tokens=False)
            assert tok.unk_token_id not in enc["input_ids"]
            assert len(tok(" " + row["answer"], add_special_tokens=False)["input_ids"]) == 1
            start, end = row["spans"]["IO"]
            hits = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
            assert len(hits) == 1 and tuple(enc["offset_mapping"][hits[0]]) == (start, end)
            assert tok.convert_ids_to_tokens(enc["input_ids"][hits[0]]) == row["answer"]
