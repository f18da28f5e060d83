"""Rows of a text file as tokens: the text before the answer (documents, prompt, tool call), the
prompt/answer boundary, spans as token ranges, answer and foil tokens, paraphrases aligned to the
prompt, counterfactual rows and tool tokens; each bad value is a one-line error naming the file,
row and column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from faithful_train.errors import DataError


class RowEncoder:
    """Tokenizes a split's rows with one tokenizer (from ``tokenizer_dir``, named in errors) and one
    ``document_separator`` (put after each document)."""

    def __init__(self, tokenizer: Any, tokenizer_dir: Path, document_separator: str):
        self.tokenizer = tokenizer
        self.tokenizer_dir = tokenizer_dir
        self.document_separator = document_separator

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
        enc = self.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        return enc["input_ids"], offsets, [bool(s) for s in enc["special_tokens_mask"]]

    def tokenize(self, rows: list[dict[str, Any]], path: Path) -> dict[str, Any]:
        """A split's rows (of the file ``path``) as the tokenized split the task batches from."""
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
            raise DataError(
                f"{path}: column 'paraphrase' cannot be combined with {' or '.join(sorted(evidence))} "
                "(paraphrases are of the prompt alone)"
            )
        if "steps" in columns and "tool_calls" in columns:
            raise DataError(f"{path}: columns 'steps' and 'tool_calls' in one file: give a rationale or a tool call")
        if "counterfactual.document" in columns and "tool_calls" in columns:
            raise DataError(
                f"{path}: counterfactual documents and tool calls in one file: give one kind of counterfactual evidence"
            )
        cf_evidence = (
            "counterfactual.document" in columns
            or "counterfactual.steps" in columns
            or _calls_have(rows[0], "counterfactual_result")
        )
        if "rationale_paraphrase" in columns and "steps" not in columns:
            raise DataError(f"{path}: column 'rationale_paraphrase' needs a 'steps' column (the rationale it rewrites)")
        if "counterfactual.steps" in columns and "steps" not in columns:
            raise DataError(f"{path}: column 'counterfactual.steps' needs a 'steps' column (the rationale it changes)")
        out: dict[str, Any] = {
            "path": str(path),
            "tokens": [],
            "prompt_len": [],
            "answer_len": [],
            "spans": {s: [] for s in spans},
            "variables": {v: [] for v in variables},
            "values": {},
            "concepts": {c: [] for c in concepts},
            "concept_values": {},
            "pairs": {v: [] for v in pairs},
            "cf_answers": {v: [] for v in pairs},
            "irrelevant": [] if "irrelevant" in columns else None,
            "paraphrase": [] if "paraphrase" in columns else None,
            "paraphrase_source": [] if "paraphrase" in columns else None,
            "foil": [] if "foil" in columns else None,
            "documents": [] if "documents" in columns else None,
            "doc_kind": [] if "documents" in columns else None,
            "tool": [] if "tool_calls" in columns else None,
            "steps": [] if "steps" in columns else None,
            "cf_step": [] if "counterfactual.steps" in columns else None,
            "steps_paraphrase": [] if "rationale_paraphrase" in columns else None,
            "cf_evidence": [] if cf_evidence else None,
        }
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
                    raise DataError(
                        f"{where} column 'documents': {len(docs)} documents, but row 0 has {n_docs} "
                        "(every row needs as many)"
                    )
            if out["steps"] is not None:
                _steps(row.get("steps"), f"{where} column 'steps'")
            context, marks, start = self._render(row, where)
            tokens, offsets, special, prompt_len = self._split(context, str(answer), f"{where} column 'answer'")
            out["tokens"].append(tokens)
            out["prompt_len"].append(prompt_len)
            out["answer_len"].append(len(tokens) - prompt_len)
            for s in spans:
                spec = _shifted(row.get(f"spans.{s}"), prompt, start)
                out["spans"][s].append(
                    self._span(context, spec, offsets, special, prompt_len, f"{where} column 'spans.{s}'")
                )
            token_spans = {
                name: self._span(context, list(chars), offsets, special, prompt_len, f"{where} column {name!r}")
                for name, chars in marks.items()
            }
            if out["documents"] is not None:
                out["documents"].append([token_spans[f"doc{j}"] for j in range(n_docs)])
                out["doc_kind"].append(
                    self._doc_kinds(row.get("gold_document"), n_docs, f"{where} column 'gold_document'")
                )
            if out["steps"] is not None:
                out["steps"].append([token_spans[f"step{j}"] for j in range(len(row["steps"]))])
            if out["cf_step"] is not None:
                out["cf_step"].append(self._changed_step(row, where))
            if out["steps_paraphrase"] is not None:
                out["steps_paraphrase"].append(self._paraphrased_rationale(row, str(answer), where))
            if out["tool"] is not None:
                tool = self._tool_token(tokens, token_spans["tool"], row, where)
                out["tool"].append((tool, token_spans["tool"], token_spans["result"]))
            if out["cf_evidence"] is not None:
                kinds = out["doc_kind"][-1] if out["doc_kind"] is not None else None
                out["cf_evidence"].append(self._counterfactual_row(row, kinds, tokens, where))
            for v in variables:
                out["variables"][v].append(json.dumps(row.get(f"variables.{v}")))
            for c in concepts:
                out["concepts"][c].append(json.dumps(row.get(f"concepts.{c}")))
            for v in pairs:
                source = row.get(f"source.{v}")
                if not isinstance(source, int) or not 0 <= source < len(rows):
                    raise DataError(
                        f"{where} column 'source.{v}': {source!r} is not a row index of {path} (0..{len(rows) - 1})"
                    )
                column = f"{where} column 'counterfactual_answer.{v}'"
                cf = self.answer_tokens(str(row.get(f"counterfactual_answer.{v}") or ""), context, column)
                if len(cf) != len(tokens) - prompt_len:
                    raise DataError(
                        f"{where} column 'counterfactual_answer.{v}': {len(cf)} tokens, but the answer has "
                        f"{len(tokens) - prompt_len} (teacher forcing needs answers of one length)"
                    )
                out["pairs"][v].append(source)
                out["cf_answers"][v].append(cf)
            if out["foil"] is not None:
                out["foil"].append(self.answer_tokens(str(row.get("foil") or ""), context, f"{where} column 'foil'")[0])
            if out["irrelevant"] is not None:
                marked = [0] * prompt_len
                for i, span in enumerate(row.get("irrelevant") or []):
                    spec = _shifted(span, prompt, start)
                    first, stop = self._span(
                        context, spec, offsets, special, prompt_len, f"{where} column 'irrelevant' item {i}"
                    )
                    for t in range(first, stop):
                        marked[t] = 1
                out["irrelevant"].append(marked)
            if out["paraphrase"] is not None:
                column = f"{where} column 'paraphrase'"
                para, source = self._paraphrase(
                    row.get("paraphrase"), prompt, tokens[:prompt_len], offsets, str(answer), column
                )
                out["paraphrase"].append(para)
                out["paraphrase_source"].append(source)
        for v in variables:
            out["values"][v] = sorted(set(out["variables"][v]))
        for c in concepts:
            out["concept_values"][c] = sorted(set(out["concepts"][c]))
        return out

    def _render(
        self, row: dict[str, Any], where: str, override: dict[str, str] | None = None
    ) -> tuple[str, dict[str, tuple[int, int]], int]:
        """The text before the answer: the documents (each followed by the separator), the prompt,
        the rationale's steps (each after a space) and its ``conclusion``, then the tool call `` <tool> <arguments>
        <result>``; the character span of each document, step, the tool and the result; and where
        the prompt starts. ``override`` replaces a piece (``doc<j>``, ``result``, ``steps``) by
        another: a counterfactual row."""
        override = override or {}
        text, marks = "", {}
        for j, doc in enumerate(row.get("documents") or []):
            doc = override.get(f"doc{j}", doc)
            marks[f"doc{j}"] = (len(text), len(text) + len(doc))
            text += doc + self.document_separator
        start = len(text)
        text += row["prompt"]
        for j, step in enumerate(override.get("steps") or row.get("steps") or []):
            text += " "
            marks[f"step{j}"] = (len(text), len(text) + len(step))
            text += step
        if row.get("conclusion"):  # after the rationale, before the answer (GSM8K's "####")
            text += " " + str(row["conclusion"])
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
                f"{where} column 'tool_calls' item 0 'tool': {tool!r} is not a token of the tokenizer in "
                f"{self.tokenizer_dir} (it reads as {found}); name each tool by one token of the vocabulary"
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

    def _counterfactual_row(
        self, row: dict[str, Any], kinds: list[int] | None, tokens: list[int], where: str
    ) -> list[int]:
        """The tokens of the row with its evidence changed (the gold document, or the tool's result)
        and the answer that evidence gives; the same number of tokens as the row."""
        if "tool_calls" in row:
            call = row["tool_calls"][0]
            column = "tool_calls' item 0 'counterfactual_result"
            new, answer = call.get("counterfactual_result"), call.get("counterfactual_answer")
            override = {"result": new}
        elif "counterfactual.steps" in row:
            column = "counterfactual.steps"
            steps = _steps(row.get(column), f"{where} column '{column}'")
            if len(steps) != len(row["steps"]):
                raise DataError(f"{where} column '{column}': {len(steps)} steps, the rationale has {len(row['steps'])}")
            new, answer = " ".join(steps), row.get("counterfactual.answer")
            override = {"steps": steps}
        else:
            if kinds is None or 0 not in kinds:
                raise DataError(
                    f"{where} column 'counterfactual.document': needs a 'gold_document' (which document it replaces)"
                )
            column = "counterfactual.document"
            new, answer = row.get("counterfactual.document"), row.get("counterfactual.answer")
            override = {f"doc{kinds.index(0)}": new}
        if not isinstance(new, str) or not new.strip():
            raise DataError(f"{where} column '{column}': empty or not text: {new!r}")
        if answer is None or str(answer) == "":
            answer_column = column.replace("result", "answer").replace("document", "answer").replace("steps", "answer")
            raise DataError(f"{where} column '{answer_column}': empty answer")
        context, _, _ = self._render(row, where, override)
        cf, _, _, _ = self._split(context, str(answer), f"{where} column '{column}'")
        if len(cf) != len(tokens):
            raise DataError(
                f"{where} column '{column}': the counterfactual row has {len(cf)} tokens, the row {len(tokens)} "
                "(a counterfactual keeps the evidence's and the answer's token lengths)"
            )
        return cf

    def _paraphrased_rationale(self, row: dict[str, Any], answer: str, where: str) -> tuple[list[int], int]:
        """The row's tokens with its rationale paraphrased (``rationale_paraphrase``: as many
        steps, any lengths), and where its answer starts."""
        column = f"{where} column 'rationale_paraphrase'"
        steps = _steps(row.get("rationale_paraphrase"), column)
        if len(steps) != len(row["steps"]):
            raise DataError(f"{column}: {len(steps)} steps, the rationale has {len(row['steps'])}")
        context, _, _ = self._render(row, where, {"steps": steps})
        tokens, _, _, prompt_len = self._split(context, answer, column)
        return tokens, prompt_len

    @staticmethod
    def _changed_step(row: dict[str, Any], where: str) -> int:
        """Which step a counterfactual rationale changes (``counterfactual.step``, 0-based)."""
        step = row.get("counterfactual.step")
        if not isinstance(step, int) or not 0 <= step < len(row["steps"]):
            raise DataError(
                f"{where} column 'counterfactual.step': {step!r} is not a step index (0..{len(row['steps']) - 1})"
            )
        return step

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

    def answer_tokens(self, answer: str, prompt: str, where: str) -> list[int]:
        """The tokens of ``answer`` after ``prompt`` (as the row's answer is tokenized)."""
        if not answer:
            raise DataError(f"{where}: empty answer")
        tokens, _, _, prompt_len = self._split(prompt, answer, where)
        return tokens[prompt_len:]

    @staticmethod
    def _span(
        prompt: str, spec: Any, offsets: list, special: list[bool], prompt_len: int, where: str
    ) -> tuple[int, int]:
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

    def _paraphrase(
        self, text: Any, prompt: str, prompt_tokens: list[int], offsets: list, answer: str, where: str
    ) -> tuple[list[int], list[int]]:
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


def _steps(value: Any, where: str) -> list[str]:
    """A rationale: a non-empty list of non-empty step texts."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"{where}: a list of non-empty step texts, got {value!r}")
    return value


def _calls_have(row: dict[str, Any], key: str) -> bool:
    """Whether a row's first tool call carries ``key`` (a file's calls share their fields)."""
    calls = row.get("tool_calls")
    return isinstance(calls, list) and bool(calls) and isinstance(calls[0], dict) and calls[0].get(key) is not None
