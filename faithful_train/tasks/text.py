"""The ``text`` task: examples from local JSONL, CSV or Parquet files, tokenized by a Hugging Face
tokenizer, so every objective and audit runs on language-model data.

    task: {name: text, train: data/train.jsonl, val: data/val.jsonl, audit: data/audit.jsonl,
           tokenizer: data/tokenizer, ppl: data/text.txt}

Columns (nested JSON objects are flattened: ``{"spans": {"IO": ...}}`` is ``spans.IO``):

    prompt                       the text before the answer (required)
    answer                       the answer; may be several tokens (required). The text the model
                                 sees is ``prompt + answer`` (a space between them unless one is there)
    variables.<name>             the value of a causal variable (any string or number)
    source.<name>                explicit counterfactual pair: the row (0-based, same file) whose
    counterfactual_answer.<name>   value of <name> the intervention takes, and the answer then
    spans.<name>                 a character span ``[start, end)`` of the prompt, or a substring
                                 (its first occurrence); alignments name it as ``positions: {span: <name>}``
    concepts.<name>              a concept label (any string or number)
    paraphrase                   a meaning-preserving rewrite of the prompt; its tokens are aligned
                                 to the prompt's by their text (through the tokenizer's offsets)
    irrelevant                   a list of spans (as ``spans.*``) the answer must not depend on
    foil                         the competing answer of a two-answer task (IOI: S); validation
                                 then reports ``val/logit_diff``, answer against foil (first tokens)
    documents                    a list of texts put before the prompt, each followed by
                                 ``document_separator`` (default a newline); spans ``doc0``, ``doc1``, ...
                                 (every row has the same number). For the ``retrieval`` audit
    gold_document                the index of the document the answer comes from
    counterfactual.document      the gold document with its fact changed (the same number of tokens),
    counterfactual.answer          and the answer it then gives (the same number of tokens)
    tool_calls                   a list of one call ``{"tool", "arguments", "result",
                                 "counterfactual_result", "counterfactual_answer"}`` put after the
                                 prompt as `` <tool> <arguments> <result>``: the tool is one token of
                                 the tokenizer, which the model is trained to emit (``span/tool``,
                                 ``tool_ids``); ``span/result`` is the result. For the ``tools`` audit

Counterfactual answers come from explicit pairs, or from ``label_fn: file.py:fn``, a function of
one row's variables (``{name: value}``) returning the answer (the causal model); sources are then
other rows of the batch. Each split is tokenized once and cached under ``cache_dir`` (default
``~/.cache/faithful_train/text``), keyed by the file's and the tokenizer's hashes.

Training batches are whole, seeded permutations of the train file, epoch after epoch; batch ``k``
is a pure function of ``k``, so ``--resume`` continues at the exact example. Validation uses the
``val`` file, audits the ``audit`` file (default: ``val``), and ``ppl`` (plain text, one document
per line) gives ``val/ppl``. ``lm_text`` (plain text) adds a batch of its lines to every training
step for the language-model loss (``loss.lm``): text the model learns from besides the examples. Bad data is a one-line error naming the file, row and column.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from faithful_train.errors import ConfigError, DataError, UnknownNameError, first_line
from faithful_train.tasks.base import Batch, Pairs, Task

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
PADDING_SIDES = ("right", "left")
SPLITS = ("train", "val", "audit")
CACHE_VERSION = 3  # bump when the cached format changes


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A fast tokenizer from a local directory (never the Hub), or a one-line error."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"tokenizer directory not found: {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"no tokenizer in {folder}: {first_line(e)}") from None
    if not tokenizer.is_fast:
        raise DataError(f"the tokenizer in {folder} is not a fast tokenizer (offsets are needed)")
    return tokenizer


def _tokenizer_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(file.name.encode())
        digest.update(_hash_file(file).encode())
    return digest.hexdigest()


def read_rows(path: Path, where: str) -> list[dict[str, Any]]:
    """Rows of a local JSONL/CSV/Parquet file through Hugging Face ``datasets``, columns flattened."""
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{where}: {path} is not a .jsonl, .json, .csv or .parquet file")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        data = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # datasets raises many kinds; all mean the file cannot be read
        raise DataError(f"{path}: cannot read it as {kind}: {first_line(e)}") from None
    while any(isinstance(f, dict) or type(f).__name__ == "Features" for f in data.features.values()):
        data = data.flatten()
    return data.to_list()


class TextTask(Task):
    name = "text"

    def __init__(
        self,
        train: str,
        tokenizer: str,
        val: str | None = None,
        audit: str | None = None,
        ppl: str | None = None,
        label_fn: str | None = None,
        lm_text: str | None = None,
        padding_side: str = "right",
        cache_dir: str | None = None,
        document_separator: str = "\n",
    ):
        if padding_side not in PADDING_SIDES:
            raise UnknownNameError("padding_side", padding_side, PADDING_SIDES)
        self.padding_side = padding_side
        self.document_separator = str(document_separator)
        self.tokenizer_dir = Path(tokenizer)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.cache_dir = Path(cache_dir or os.environ.get("FAITHFUL_TRAIN_CACHE", Path.home() / ".cache" / "faithful_train" / "text"))
        self._tokenizer_hash = _tokenizer_hash(self.tokenizer_dir)
        files = {"train": train, "val": val or train, "audit": audit or val or train}
        self.files = {split: Path(path) for split, path in files.items()}
        self.splits = {split: self._load(split, path) for split, path in self.files.items()}
        train_split = self.splits["train"]
        self.variables = tuple(train_split["variables"])
        self._values = {v: list(train_split["values"][v]) for v in self.variables}
        for split in self.splits.values():  # one code per value across splits (audit may hold new ones)
            for v in self.variables:
                for value in split["values"].get(v, []):
                    if value not in self._values[v]:
                        self._values[v].append(value)
        self.label_fn = self._load_label_fn(label_fn) if label_fn else None
        self.ppl_file = Path(ppl) if ppl else None
        self._ppl: list[list[int]] | None = None
        self.lm_lines = self._read_lines(Path(lm_text), "task.lm_text") if lm_text else None
        self._answer_cache: dict[str, list[int]] = {}

    # -- reading and tokenizing ------------------------------------------------------------------

    def _load(self, split: str, path: Path) -> dict[str, Any]:
        where = f"task.{split}"
        if not path.is_file():
            raise DataError(f"{where}: file not found: {path}")
        key = hashlib.sha256(f"{CACHE_VERSION}:{_hash_file(path)}:{self._tokenizer_hash}:{self.document_separator!r}".encode()).hexdigest()[:24]
        cached = self.cache_dir / f"{path.stem}-{key}.pt"
        if cached.is_file():
            try:
                return torch.load(cached, weights_only=True)
            except Exception:  # a cache from another version: tokenize again
                pass
        data = self._tokenize(read_rows(path, where), path)
        self._write_cache(cached, data)
        return data

    @staticmethod
    def _write_cache(path: Path, data: dict[str, Any]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(data, tmp)
            os.replace(tmp, path)
        except OSError:  # an unwritable cache only costs the next run a re-tokenization
            pass

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        enc = self.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]], [bool(s) for s in enc["special_tokens_mask"]]

    def _tokenize(self, rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
        if not rows:
            raise DataError(f"{path}: no rows")
        columns = set(rows[0])
        for required in ("prompt", "answer"):
            if required not in columns:
                raise DataError(f"{path}: no column {required!r}; columns: {', '.join(sorted(columns))}")
        variables = sorted(c.split(".", 1)[1] for c in columns if c.startswith("variables."))
        spans = sorted(c.split(".", 1)[1] for c in columns if c.startswith("spans."))
        concepts = sorted(c.split(".", 1)[1] for c in columns if c.startswith("concepts."))
        pairs = sorted(c.split(".", 1)[1] for c in columns if c.startswith("source."))
        for v in pairs:
            if f"counterfactual_answer.{v}" not in columns:
                raise DataError(f"{path}: column 'source.{v}' needs a 'counterfactual_answer.{v}' column")
        evidence = {c for c in ("documents", "tool_calls") if c in columns}
        if evidence and "paraphrase" in columns:
            raise DataError(f"{path}: column 'paraphrase' cannot be combined with {' or '.join(sorted(evidence))} (paraphrases are of the prompt alone)")
        if "counterfactual.document" in columns and "tool_calls" in columns:
            raise DataError(f"{path}: counterfactual documents and tool calls in one file: give one kind of counterfactual evidence")
        out: dict[str, Any] = {
            "path": str(path), "tokens": [], "prompt_len": [], "answer_len": [], "spans": {s: [] for s in spans},
            "variables": {v: [] for v in variables}, "values": {}, "concepts": {c: [] for c in concepts}, "concept_values": {},
            "pairs": {v: [] for v in pairs}, "cf_answers": {v: [] for v in pairs}, "irrelevant": [] if "irrelevant" in columns else None,
            "paraphrase": [] if "paraphrase" in columns else None, "paraphrase_source": [] if "paraphrase" in columns else None,
            "foil": [] if "foil" in columns else None, "documents": [] if "documents" in columns else None,
            "doc_kind": [] if "documents" in columns else None, "tool": [] if "tool_calls" in columns else None,
            "cf_evidence": [] if "counterfactual.document" in columns or _calls_have(rows[0], "counterfactual_result") else None,
        }  # fmt: skip
        n_docs = None
        for r, row in enumerate(rows):
            where = f"{path} row {r}"
            prompt, answer = row.get("prompt"), row.get("answer")
            if not isinstance(prompt, str) or not prompt:
                raise DataError(f"{where} column 'prompt': empty or not text: {prompt!r}")
            if answer is None or str(answer) == "":
                raise DataError(f"{where} column 'answer': empty answer")
            if out["documents"] is not None:
                docs = row.get("documents")
                if not isinstance(docs, list) or not docs or not all(isinstance(d, str) and d.strip() for d in docs):
                    raise DataError(f"{where} column 'documents': a list of non-empty texts, got {docs!r}")
                n_docs = len(docs) if n_docs is None else n_docs
                if len(docs) != n_docs:
                    raise DataError(f"{where} column 'documents': {len(docs)} documents, but row 0 has {n_docs} (every row needs as many)")
            context, marks, start = self._render(row, where)
            tokens, offsets, special, prompt_len = self._split(context, str(answer), f"{where} column 'answer'")
            out["tokens"].append(tokens)
            out["prompt_len"].append(prompt_len)
            out["answer_len"].append(len(tokens) - prompt_len)
            for s in spans:
                spec = _shifted(row.get(f"spans.{s}"), prompt, start)
                out["spans"][s].append(self._span(context, spec, offsets, special, prompt_len, f"{where} column 'spans.{s}'"))
            token_spans = {name: self._span(context, list(chars), offsets, special, prompt_len, f"{where} column {name!r}") for name, chars in marks.items()}
            if out["documents"] is not None:
                out["documents"].append([token_spans[f"doc{j}"] for j in range(n_docs)])
                out["doc_kind"].append(self._doc_kinds(row.get("gold_document"), n_docs, f"{where} column 'gold_document'"))
            if out["tool"] is not None:
                tool = self._tool_token(tokens, token_spans["tool"], row, where)
                out["tool"].append((tool, token_spans["tool"], token_spans["result"]))
            if out["cf_evidence"] is not None:
                out["cf_evidence"].append(self._counterfactual_row(row, out["doc_kind"][-1] if out["doc_kind"] is not None else None, tokens, where))
            for v in variables:
                out["variables"][v].append(json.dumps(row.get(f"variables.{v}")))
            for c in concepts:
                out["concepts"][c].append(json.dumps(row.get(f"concepts.{c}")))
            for v in pairs:
                source = row.get(f"source.{v}")
                if not isinstance(source, int) or not 0 <= source < len(rows):
                    raise DataError(f"{where} column 'source.{v}': {source!r} is not a row index of {path} (0..{len(rows) - 1})")
                cf = self._answer_tokens(str(row.get(f"counterfactual_answer.{v}") or ""), context, f"{where} column 'counterfactual_answer.{v}'")
                if len(cf) != len(tokens) - prompt_len:
                    raise DataError(
                        f"{where} column 'counterfactual_answer.{v}': {len(cf)} tokens, but the answer has {len(tokens) - prompt_len} "
                        "(teacher forcing needs answers of one length)"
                    )
                out["pairs"][v].append(source)
                out["cf_answers"][v].append(cf)
            if out["foil"] is not None:
                out["foil"].append(self._answer_tokens(str(row.get("foil") or ""), context, f"{where} column 'foil'")[0])
            if out["irrelevant"] is not None:
                marked = [0] * prompt_len
                for i, span in enumerate(row.get("irrelevant") or []):
                    spec = _shifted(span, prompt, start)
                    first, stop = self._span(context, spec, offsets, special, prompt_len, f"{where} column 'irrelevant' item {i}")
                    for t in range(first, stop):
                        marked[t] = 1
                out["irrelevant"].append(marked)
            if out["paraphrase"] is not None:
                para, source = self._paraphrase(row.get("paraphrase"), prompt, tokens[:prompt_len], offsets, str(answer), f"{where} column 'paraphrase'")
                out["paraphrase"].append(para)
                out["paraphrase_source"].append(source)
        for v in variables:
            out["values"][v] = sorted(set(out["variables"][v]))
        for c in concepts:
            out["concept_values"][c] = sorted(set(out["concepts"][c]))
        return out

    def _render(self, row: dict[str, Any], where: str, override: dict[str, str] | None = None) -> tuple[str, dict[str, tuple[int, int]], int]:
        """The text before the answer: the documents (each followed by the separator), the prompt,
        then the tool call `` <tool> <arguments> <result>``; the character span of each document,
        the tool and the result; and where the prompt starts. ``override`` replaces a piece
        (``doc<j>``, ``result``) by another text: a counterfactual row."""
        override = override or {}
        text, marks = "", {}
        for j, doc in enumerate(row.get("documents") or []):
            doc = override.get(f"doc{j}", doc)
            marks[f"doc{j}"] = (len(text), len(text) + len(doc))
            text += doc + self.document_separator
        start = len(text)
        text += row["prompt"]
        if "tool_calls" in row:
            call = self._tool_call(row.get("tool_calls"), where)
            text += " "
            marks["tool"] = (len(text), len(text) + len(call["tool"]))
            text += call["tool"]
            if call.get("arguments"):
                text += " " + str(call["arguments"])
            result = override.get("result", str(call["result"]))
            text += " "
            marks["result"] = (len(text), len(text) + len(result))
            text += result
        return text, marks, start

    @staticmethod
    def _tool_call(calls: Any, where: str) -> dict[str, Any]:
        where = f"{where} column 'tool_calls'"
        if not isinstance(calls, list) or len(calls) != 1:
            raise DataError(f"{where}: a list of one call {{tool, arguments, result}}, got {calls!r}")
        call = calls[0]
        if not isinstance(call, dict):
            raise DataError(f"{where} item 0: a call is an object {{tool, arguments, result}}, got {call!r}")
        for key in ("tool", "result"):
            if not isinstance(call.get(key), str) or not call[key].strip():
                raise DataError(f"{where} item 0 {key!r}: empty or not text: {call.get(key)!r}")
        return call

    def _tool_token(self, tokens: list[int], span: tuple[int, int], row: dict[str, Any], where: str) -> int:
        """The tool's token: the tool must be one token of the tokenizer (the model emits it)."""
        tool = row["tool_calls"][0]["tool"]
        if span[1] - span[0] != 1 or tokens[span[0]] == self.tokenizer.unk_token_id:
            found = "the unknown token" if span[1] - span[0] == 1 else f"{span[1] - span[0]} tokens"
            raise DataError(
                f"{where} column 'tool_calls' item 0 'tool': {tool!r} is not a token of the tokenizer in {self.tokenizer_dir} "
                f"(it reads as {found}); name each tool by one token of the vocabulary"
            )
        return tokens[span[0]]

    @staticmethod
    def _doc_kinds(gold: Any, n_docs: int, where: str) -> list[int]:
        """Per document: 0 for the gold one, 3 ("other") for the rest; all 3 without a gold index."""
        if gold is None:
            return [3] * n_docs
        if not isinstance(gold, int) or not 0 <= gold < n_docs:
            raise DataError(f"{where}: {gold!r} is not a document index (0..{n_docs - 1})")
        return [0 if j == gold else 3 for j in range(n_docs)]

    def _counterfactual_row(self, row: dict[str, Any], kinds: list[int] | None, tokens: list[int], where: str) -> list[int]:
        """The tokens of the row with its evidence changed (the gold document, or the tool's result)
        and the answer that evidence gives; the same number of tokens as the row."""
        if "tool_calls" in row:
            call = row["tool_calls"][0]
            column, new, answer = "tool_calls' item 0 'counterfactual_result", call.get("counterfactual_result"), call.get("counterfactual_answer")
            override = {"result": new}
        else:
            if kinds is None or 0 not in kinds:
                raise DataError(f"{where} column 'counterfactual.document': needs a 'gold_document' (which document it replaces)")
            column, new, answer = "counterfactual.document", row.get("counterfactual.document"), row.get("counterfactual.answer")
            override = {f"doc{kinds.index(0)}": new}
        if not isinstance(new, str) or not new.strip():
            raise DataError(f"{where} column '{column}': empty or not text: {new!r}")
        if answer is None or str(answer) == "":
            raise DataError(f"{where} column '{column.replace('result', 'answer').replace('document', 'answer')}': empty answer")
        context, _, _ = self._render(row, where, override)
        cf, _, _, _ = self._split(context, str(answer), f"{where} column '{column}'")
        if len(cf) != len(tokens):
            raise DataError(
                f"{where} column '{column}': the counterfactual row has {len(cf)} tokens, the row {len(tokens)} "
                "(a counterfactual keeps the evidence's and the answer's token lengths)"
            )
        return cf

    def _join(self, prompt: str, answer: str) -> str:
        return prompt + answer if prompt[-1].isspace() or answer[0].isspace() else f"{prompt} {answer}"

    def _split(self, prompt: str, answer: str, where: str) -> tuple[list[int], list, list[bool], int]:
        """Tokens of ``prompt + answer`` and how many belong to the prompt (a token across the
        boundary is an error: the answer must start a new token)."""
        text = self._join(prompt, answer)
        tokens, offsets, special = self._encode(text)
        boundary = len(prompt)
        prompt_len = 0
        for t, ((start, stop), is_special) in enumerate(zip(offsets, special)):
            if is_special and t == prompt_len:
                prompt_len += 1  # leading special tokens (BOS) belong to the prompt
            elif not is_special and stop <= boundary:
                prompt_len = t + 1
            elif not is_special and start < boundary < stop:
                raise DataError(f"{where}: a token spans the end of the prompt and the answer ({text[start:stop]!r})")
        answer_tokens = [tok for tok, s in zip(tokens[prompt_len:], special[prompt_len:]) if not s]
        if not answer_tokens:
            raise DataError(f"{where}: the answer {answer!r} tokenizes to nothing")
        if prompt_len == 0:
            raise DataError(f"{where}: the prompt tokenizes to nothing")
        return tokens[:prompt_len] + answer_tokens, offsets[:prompt_len], special[:prompt_len], prompt_len

    def _answer_tokens(self, answer: str, prompt: str, where: str) -> list[int]:
        if not answer:
            raise DataError(f"{where}: empty answer")
        tokens, _, _, prompt_len = self._split(prompt, answer, where)
        return tokens[prompt_len:]

    @staticmethod
    def _span(prompt: str, spec: Any, offsets: list, special: list[bool], prompt_len: int, where: str) -> tuple[int, int]:
        """Token ``[start, stop)`` of a character span ``[start, end)`` or a substring of the prompt."""
        if isinstance(spec, str):
            start = prompt.find(spec) if spec else -1
            if start < 0:
                raise DataError(f"{where}: {spec!r} is not in the prompt")
            chars = (start, start + len(spec))
        elif isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(x, int) for x in spec):
            chars = (int(spec[0]), int(spec[1]))
            if not 0 <= chars[0] < chars[1] <= len(prompt):
                raise DataError(f"{where}: span {list(spec)} is outside the prompt (length {len(prompt)})")
        else:
            raise DataError(f"{where}: a span is [start, end] or a substring of the prompt, got {spec!r}")
        hit = [t for t in range(prompt_len) if not special[t] and offsets[t][0] < chars[1] and offsets[t][1] > chars[0]]
        if not hit:
            raise DataError(f"{where}: span {chars} covers no token")
        return hit[0], hit[-1] + 1

    def _paraphrase(self, text: Any, prompt: str, prompt_tokens: list[int], offsets: list, answer: str, where: str) -> tuple[list[int], list[int]]:
        """The paraphrase's prompt tokens and, per token, the prompt token it stands for (the next
        unused prompt token with the same text), or -1."""
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: empty or not text: {text!r}")
        tokens, para_offsets, special = self._encode(text)
        words = [prompt[a:b] for a, b in offsets]
        used: set[int] = set()
        source = []
        for t, ((a, b), is_special) in enumerate(zip(para_offsets, special)):
            word = text[a:b]
            match = -1
            for i, w in enumerate(words):
                if i not in used and (w == word if not is_special else prompt_tokens[i] == tokens[t]):
                    match = i
                    break
            if match >= 0:
                used.add(match)
            source.append(match)
        return tokens, source

    def _load_label_fn(self, spec: str) -> Callable[[dict[str, Any]], Any]:
        from faithful_train.registry import load_callable

        return load_callable(spec, "label_fn", [Path.cwd(), self.files["train"].parent])

    # -- what the task provides ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def seq_len(self) -> int:
        return max(max(p + a - 1 for p, a in zip(s["prompt_len"], s["answer_len"])) for s in self.splits.values())

    def check_context(self, context: int) -> None:
        """Every input fits the model's context, or an error naming the longest row."""
        for split, data in self.splits.items():
            lengths = [p + a - 1 for p, a in zip(data["prompt_len"], data["answer_len"])]
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[longest] > context:
                raise DataError(
                    f"{data['path']} row {longest} column 'prompt': {lengths[longest]} tokens with the answer, "
                    f"longer than the model's context ({context})"
                )

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        firsts = {s["tokens"][r][s["prompt_len"][r]] for s in self.splits.values() for r in range(len(s["tokens"]))}
        for s in self.splits.values():
            firsts |= {a[0] for answers in s["cf_answers"].values() for a in answers}
        return tuple(sorted(firsts))

    @property
    def answer_length(self) -> int:
        return max(max(s["answer_len"]) for s in self.splits.values())

    @property
    def spans(self) -> tuple[str, ...]:
        data = self.splits["train"]
        docs = tuple(f"doc{j}" for j in range(len(data["documents"][0]))) if data["documents"] is not None else ()
        tools = ("tool", "result") if data["tool"] is not None else ()
        return tuple(data["spans"]) + docs + tools

    @property
    def filler_token(self) -> int:
        return self.pad_id

    @property
    def tool_tokens(self) -> tuple[int, ...]:
        return tuple(sorted({t[0] for s in self.splits.values() if s["tool"] is not None for t in s["tool"]}))

    def counterfactual_evidence(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Each row with its ``counterfactual.document`` or tool call's ``counterfactual_result`` in
        place (and the counterfactual answer teacher-forced), padded as the row, and the
        counterfactual answer's first token."""
        data = self.splits[self._split_of(batch)]
        if data["cf_evidence"] is None:
            raise ConfigError(f"task 'text' has no counterfactual evidence{self.column_hint('counterfactual_evidence')}")
        ids = batch["input_ids"].clone()
        mask = batch["attention_mask"].bool()
        answers = torch.zeros(ids.shape[0], dtype=torch.long)
        for b, i in enumerate(batch["row"].tolist()):
            row = data["cf_evidence"][i]
            p, a = data["prompt_len"][i], data["answer_len"][i]
            real = mask[b].nonzero()[:, 0]
            ids[b, real] = torch.tensor(row[: p + a - 1], dtype=ids.dtype, device=ids.device)
            answers[b] = row[p]
        return ids, answers.to(ids.device)

    @property
    def concepts(self) -> dict[str, tuple[str, ...]]:
        data = self.splits["train"]
        return {c: tuple(str(json.loads(v)) for v in values) for c, values in data["concept_values"].items()}

    def column_hint(self, feature: str) -> str:
        columns = {"perturbations": "paraphrase", "irrelevant": "irrelevant", "concepts": "concepts.<name>",
                   "variables": "variables.<name>", "counterfactuals": "source.<name> + counterfactual_answer.<name>, or label_fn",
                   "documents": "documents", "tool_calls": "tool_calls",
                   "counterfactual_evidence": "counterfactual.document (with documents), or tool_calls with counterfactual_result"}  # fmt: skip
        return f" (needs a {columns[feature]!r} column in {self.files['train']})" if feature in columns else ""

    def check_variables(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.variables:
                raise UnknownNameError(f"variable of task 'text' (a 'variables.{name}' column in {self.files['train']})", name, self.variables)
            if name not in self.splits["train"]["pairs"] and self.label_fn is None:
                raise ConfigError(
                    f"variable {name!r}: counterfactual answers need 'source.{name}' and 'counterfactual_answer.{name}' "
                    f"columns in {self.files['train']}, or task.label_fn"
                )

    def check_sample_size(self, n: int, owner: str) -> None:
        rows = len(self.splits["audit"]["tokens"])
        if n > rows:
            raise ConfigError(f"{owner}: n_examples {n} exceeds the {rows} rows of {self.files['audit']}")

    # -- batches ---------------------------------------------------------------------------------

    def rows(self, split: str, index: Sequence[int]) -> Batch:
        """The rows ``index`` of a split as a padded batch, with the source rows of its explicit
        counterfactual pairs (``pair.<v>/...``, padded to the same length)."""
        data = self.splits[split]
        index = [int(i) for i in index]
        sources = {v: [pairs[i] for i in index] for v, pairs in data["pairs"].items()}
        length = max(data["prompt_len"][i] + data["answer_len"][i] - 1 for rows in [index, *sources.values()] for i in rows)
        batch = self._collate(data, index, length)
        for v, src in sources.items():
            batch |= {f"pair.{v}/{k}": t for k, t in self._collate(data, src, length).items()}
            cf = torch.zeros_like(batch["answer_ids"])
            for b, i in enumerate(index):
                cf[b, : len(data["cf_answers"][v][i])] = torch.tensor(data["cf_answers"][v][i])
            batch[f"pair.{v}/cf_answer_ids"] = cf
        batch["split"] = torch.full((len(index),), SPLITS.index(split), dtype=torch.long)
        return batch

    def _collate(self, data: dict[str, Any], index: list[int], length: int | None = None) -> Batch:
        inputs = [data["tokens"][i][: data["prompt_len"][i] + data["answer_len"][i] - 1] for i in index]
        T = max([len(x) for x in inputs] + [length or 0])
        A = max(data["answer_len"][i] for i in index)
        B = len(index)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        answer_ids = torch.zeros(B, A, dtype=torch.long)
        answer_pos = torch.zeros(B, A, dtype=torch.long)
        answer_mask = torch.zeros(B, A, dtype=torch.bool)
        shifts = []
        for b, (i, x) in enumerate(zip(index, inputs)):
            shift = T - len(x) if self.padding_side == "left" else 0
            shifts.append(shift)
            ids[b, shift : shift + len(x)] = torch.tensor(x)
            mask[b, shift : shift + len(x)] = 1
            p, a = data["prompt_len"][i], data["answer_len"][i]
            answer_ids[b, :a] = torch.tensor(data["tokens"][i][p : p + a])
            answer_pos[b, :a] = shift + p - 1 + torch.arange(a)
            answer_pos[b, a:] = shift + p - 1 + a - 1  # empty slots repeat the last (masked out)
            answer_mask[b, :a] = True
        batch: Batch = {
            "input_ids": ids, "attention_mask": mask, "labels": answer_ids[:, 0].clone(),
            "answer_ids": answer_ids, "answer_pos": answer_pos, "answer_mask": answer_mask,
        }  # fmt: skip
        shift_t = torch.tensor(shifts, dtype=torch.long)
        for s, spans in data["spans"].items():
            batch[f"span/{s}"] = torch.tensor([spans[i] for i in index], dtype=torch.long).view(B, 2) + shift_t[:, None]
        if data["documents"] is not None:
            for j in range(len(data["documents"][index[0]])):
                batch[f"span/doc{j}"] = torch.tensor([data["documents"][i][j] for i in index], dtype=torch.long).view(B, 2) + shift_t[:, None]
            batch["doc_kind"] = torch.tensor([data["doc_kind"][i] for i in index], dtype=torch.long)
        if data["tool"] is not None:
            batch["tool_ids"] = torch.tensor([data["tool"][i][0] for i in index], dtype=torch.long)
            for k, name in ((1, "tool"), (2, "result")):
                batch[f"span/{name}"] = torch.tensor([data["tool"][i][k] for i in index], dtype=torch.long).view(B, 2) + shift_t[:, None]
        for v in self.variables:
            codes = [self._values[v].index(data["variables"][v][i]) for i in index] if v in data["variables"] else [0] * B
            batch[f"var/{v}"] = torch.tensor(codes, dtype=torch.long)
        for c, labels in data["concepts"].items():
            values = self.splits["train"]["concept_values"].get(c, [])
            codes = [values.index(labels[i]) if labels[i] in values else 0 for i in index]
            batch[f"concept/{c}"] = torch.tensor(codes, dtype=torch.long)
        if data["foil"] is not None:
            batch["foil_ids"] = torch.tensor([data["foil"][i] for i in index], dtype=torch.long)
        if data["irrelevant"] is not None:
            marked = torch.zeros(B, T, dtype=torch.bool)
            for b, i in enumerate(index):
                row = torch.tensor(data["irrelevant"][i], dtype=torch.bool)
                marked[b, shifts[b] : shifts[b] + len(row)] = row
            batch["irrelevant"] = marked
        batch["row"] = torch.tensor(index, dtype=torch.long)
        return batch

    def train_batch(self, index: int, batch_size: int, seed: int) -> Batch:
        """Batch ``index`` of the training stream: epoch ``index // n`` is a permutation seeded by
        ``(seed, epoch)``, cut into ``n`` whole batches (the remainder is dropped)."""
        rows = len(self.splits["train"]["tokens"])
        if batch_size > rows:
            raise ConfigError(f"data.batch_size {batch_size} exceeds the {rows} rows of {self.files['train']}")
        per_epoch = rows // batch_size
        epoch, k = divmod(index, per_epoch)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed((seed % 2**31) * 100_003 + epoch))
        batch = self.rows("train", order[k * batch_size : (k + 1) * batch_size].tolist())
        if self.lm_lines is not None:  # plain text for the language-model loss, its own seeded epochs
            n = len(self.lm_lines)
            epoch, k = divmod(index, max(1, n // batch_size))
            lines = torch.randperm(n, generator=torch.Generator().manual_seed((seed % 2**31) * 100_019 + epoch + 1))
            text = self._pad_lines([self.lm_lines[i] for i in lines[k * batch_size : (k + 1) * batch_size].tolist()])
            batch |= {f"lm_text/{key}": value for key, value in text.items()}
        return batch

    def validation_set(self, n: int, seed: int) -> Batch:
        return self.rows("val", range(min(n, len(self.splits["val"]["tokens"]))))

    def sample(self, n: int, seed: int) -> Batch:
        rows = len(self.splits["audit"]["tokens"])
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        return self.rows("audit", order[: min(n, rows)].tolist())

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        rows = len(self.splits["train"]["tokens"])
        return self.rows("train", torch.randint(rows, (n,), generator=generator).tolist())

    def _read_lines(self, path: Path, where: str) -> list[list[int]]:
        """Token ids of each non-empty line of a plain-text file."""
        if not path.is_file():
            raise DataError(f"{where}: file not found: {path}")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{where}: {path} has no text")
        return [self.tokenizer(line)["input_ids"] for line in lines]

    def _pad_lines(self, lines: list[list[int]]) -> Batch:
        T = max(len(x) for x in lines)
        ids = torch.full((len(lines), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(lines), T, dtype=torch.long)
        for b, x in enumerate(lines):
            shift = T - len(x) if self.padding_side == "left" else 0
            ids[b, shift : shift + len(x)] = torch.tensor(x)
            mask[b, shift : shift + len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def perplexity_batches(self, batch_size: int) -> list[Batch] | None:
        """Batches of the held-out plain text (``ppl``), for ``val/ppl``."""
        if self.ppl_file is None:
            return None
        if self._ppl is None:
            self._ppl = self._read_lines(self.ppl_file, "task.ppl")
        return [self._pad_lines(self._ppl[i : i + batch_size]) for i in range(0, len(self._ppl), batch_size)]

    # -- the causal model ------------------------------------------------------------------------

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        answers, _ = self._answers_from_codes(variables)
        return answers[:, 0]

    def _answers_from_codes(self, codes: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.label_fn is None:
            raise ConfigError("counterfactual answers from variables need task.label_fn (or explicit source.<name> columns)")
        B = next(iter(codes.values())).shape[0]
        answers = []
        for b in range(B):
            values = {v: json.loads(self._values[v][int(codes[v][b])]) for v in self.variables}
            answer = str(self.label_fn(values))
            if answer not in self._answer_cache:
                self._answer_cache[answer] = self._answer_tokens(answer, "x", f"label_fn({values})")
            answers.append(self._answer_cache[answer])
        A = max(len(a) for a in answers)
        ids = torch.zeros(B, A, dtype=torch.long)
        mask = torch.zeros(B, A, dtype=torch.bool)
        for b, a in enumerate(answers):
            ids[b, : len(a)] = torch.tensor(a)
            mask[b, : len(a)] = True
        return ids, mask

    def counterfactual_answers(self, base: Batch, source: Batch, variables: Sequence[str]) -> tuple[Tensor, Tensor]:
        self.check_variables(variables)
        codes = {v: (source if v in variables else base)[f"var/{v}"].cpu() for v in self.variables}
        ids, mask = self._answers_from_codes(codes)
        A = base["answer_ids"].shape[1]
        if ids.shape[1] > A or (mask.sum(1).to(base["answer_mask"].device) != base["answer_mask"].sum(1)).any():
            raise ConfigError("label_fn gave a counterfactual answer of another token length than the answer (teacher forcing needs one length)")
        device = base["input_ids"].device
        return _pad_right(ids, A, 0).to(device), _pad_right(mask, A, False).to(device)

    def explicit_pairs(self, batch: Batch, variables: Sequence[str]) -> Pairs | None:
        if not variables or not all(f"pair.{v}/input_ids" in batch for v in variables):
            return None
        sources = {v: {k.split("/", 1)[1]: t for k, t in batch.items() if k.startswith(f"pair.{v}/")} for v in variables}
        answers = {v: (sources[v].pop("cf_answer_ids"), batch["answer_mask"].bool()) for v in variables}
        return Pairs(sources, answers)

    def perturb_aligned(self, batch: Batch, generator: torch.Generator) -> tuple[Batch, Tensor] | None:
        """The paraphrase of each row (its own padding and answer position) and its alignment."""
        data = self.splits["train"]
        if data["paraphrase"] is None:
            return None
        split = self._split_of(batch)
        data = self.splits[split]
        index = batch["row"].tolist()
        B = len(index)
        inputs = [data["paraphrase"][i] + data["tokens"][i][data["prompt_len"][i] : data["prompt_len"][i] + data["answer_len"][i] - 1] for i in index]
        T = max(len(x) for x in inputs)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        source = torch.full((B, T), -1, dtype=torch.long)
        answer_pos = torch.zeros_like(batch["answer_pos"].cpu())
        base_shift = (batch["attention_mask"].cpu().long().argmax(1)).tolist()
        for b, (i, x) in enumerate(zip(index, inputs)):
            shift = T - len(x) if self.padding_side == "left" else 0
            ids[b, shift : shift + len(x)] = torch.tensor(x)
            mask[b, shift : shift + len(x)] = 1
            aligned = torch.tensor(data["paraphrase_source"][i])
            source[b, shift : shift + len(aligned)] = torch.where(aligned >= 0, aligned + base_shift[b], aligned)
            n = len(data["paraphrase"][i])
            answer_pos[b] = shift + n - 1 + torch.arange(answer_pos.shape[1]).clamp(max=data["answer_len"][i] - 1)
        device = batch["input_ids"].device
        perturbed = {k: batch[k] for k in ("labels", "answer_ids", "answer_mask")}
        perturbed |= {"input_ids": ids.to(device), "attention_mask": mask.to(device), "answer_pos": answer_pos.to(device)}
        return perturbed, source.to(device)

    def perturb(self, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return None  # paraphrases change lengths; position-aligned perturbations are not defined

    @property
    def provides(self) -> frozenset[str]:
        """From the file's columns: ``paraphrase``, ``irrelevant``, ``concepts.*``, ``documents``,
        ``tool_calls``, and counterfactual evidence."""
        data = self.splits["train"]
        kinds = {"aligned_perturbations"} if data["paraphrase"] is not None else set()
        kinds |= {"irrelevant"} if data["irrelevant"] is not None else set()
        kinds |= {"documents"} if data["documents"] is not None else set()
        kinds |= {"tool_calls"} if data["tool"] is not None else set()
        kinds |= {"counterfactual_evidence"} if data["cf_evidence"] is not None else set()
        return frozenset(kinds | ({"concepts"} if self.concepts else set()))

    @staticmethod
    def _split_of(batch: Batch) -> str:
        return SPLITS[int(batch["split"][0])] if "split" in batch and len(batch["split"]) else "train"

    def token_name(self, token: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token))


def _pad_right(values: Tensor, width: int, fill: int | bool) -> Tensor:
    extra = width - values.shape[1]
    if extra <= 0:
        return values
    return torch.cat([values, torch.full((values.shape[0], extra), fill, dtype=values.dtype)], 1)


def _shifted(spec: Any, prompt: str, start: int) -> Any:
    """A span of the prompt (``[start, end]`` or a substring) as a character span of the text the
    prompt sits in from character ``start`` (after documents)."""
    if start == 0 or spec is None:
        return spec
    if isinstance(spec, str):
        at = prompt.find(spec) if spec else -1
        if at < 0:
            return spec  # _span names the error
        return [start + at, start + at + len(spec)]
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and all(isinstance(x, int) for x in spec):
        return [start + spec[0], start + spec[1]]
    return spec


def _calls_have(row: dict[str, Any], key: str) -> bool:
    """Whether a row's first tool call carries ``key`` (a file's calls share their fields)."""
    calls = row.get("tool_calls")
    return isinstance(calls, list) and bool(calls) and isinstance(calls[0], dict) and calls[0].get(key) is not None
