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
    steps                        a rationale: a list of step texts put after the prompt (each after
                                 a space), before the answer; spans ``step0``, ``step1``, ... (those
                                 every row has), ``step_spans``/``n_steps`` in batches. For the ``cot``
                                 audit on text
    conclusion                   text after the steps, before the answer (GSM8K's ``####``)
    rationale_paraphrase         the steps rewritten (as many, any lengths): the answer should not change
    counterfactual.step          with ``counterfactual.steps`` (the rationale with that step's result
    counterfactual.answer          changed and the later steps continued from it, as many tokens) and
                                 the answer it implies
    tool_calls                   a list of one call ``{"tool", "arguments", "result",
                                 "counterfactual_result", "counterfactual_answer"}`` put after the
                                 prompt as `` <tool> <arguments> <result>``: the tool is one token of
                                 the tokenizer, which the model is trained to emit (``span/tool``,
                                 ``tool_ids``); ``span/result`` is the result. For the ``tools`` audit

A file in GSM8K's format (columns ``question`` and ``answer``, the solution's lines then
``#### <final answer>``) is read as it is: ``question`` is the prompt, the solution's lines the
steps, ``####`` the conclusion and the text after it the answer.

Counterfactual answers come from explicit pairs, or from ``label_fn: file.py:fn``, a function of
one row's variables (``{name: value}``) returning the answer (the causal model); sources are then
other rows of the batch. On rows with ``steps`` and no ``counterfactual.*`` columns, ``label_fn``
gives the counterfactual rationales instead: the task writes a mistake into one step's result and
the function, called with that row, returns the answer it implies (or the rationale continued from
the mistake and its answer; ``tasks.text.mistakes``).

Each split is tokenized once and cached under ``cache_dir`` (default
``~/.cache/faithful_train/text``), keyed by the file's, the tokenizer's and the label_fn's hashes.

Training batches are whole, seeded permutations of the train file, epoch after epoch; batch ``k``
is a pure function of ``k``, so ``--resume`` continues at the exact example. Validation uses the
``val`` file, audits the ``audit`` file (default: ``val``), and ``ppl`` (plain text, one document
per line) gives ``val/ppl``. ``lm_text`` (plain text) adds a batch of its lines to every training
step for the ``language_model`` objective: text the model learns from besides the examples. Bad data is a
one-line error naming the file, row and column.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from faithful_train.errors import ConfigError, DataError, UnknownNameError
from faithful_train.tasks.base import Batch, Pairs, Task
from faithful_train.tasks.text.collate import collate, pad_lines, pad_right
from faithful_train.tasks.text.encoding import RowEncoder
from faithful_train.tasks.text.files import (
    cache_path,
    callable_digest,
    gsm8k_rows,
    load_tokenizer,
    read_cache,
    read_lines,
    read_rows,
    tokenizer_hash,
    write_cache,
)
from faithful_train.tasks.text.mistakes import with_mistakes

PADDING_SIDES = ("right", "left")
SPLITS = ("train", "val", "audit")


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
        self.encoder = RowEncoder(self.tokenizer, self.tokenizer_dir, self.document_separator)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        default_cache = Path.home() / ".cache" / "faithful_train" / "text"
        self.cache_dir = Path(cache_dir or os.environ.get("FAITHFUL_TRAIN_CACHE", default_cache))
        self._tokenizer_hash = tokenizer_hash(self.tokenizer_dir)
        files = {"train": train, "val": val or train, "audit": audit or val or train}
        self.files = {split: Path(path) for split, path in files.items()}
        self.label_fn = self._load_label_fn(label_fn) if label_fn else None
        self._label_fn_digest = callable_digest(label_fn, self.label_fn) if label_fn else ""
        self.splits = {split: self._load(split, path) for split, path in self.files.items()}
        found = [len(x) for s in self.splits.values() if s.get("steps") is not None for x in s["steps"]]
        self._min_steps, self.max_steps = (min(found), max(found)) if found else (0, 0)
        train_split = self.splits["train"]
        self.variables = tuple(train_split["variables"])
        self._values = {v: list(train_split["values"][v]) for v in self.variables}
        for split in self.splits.values():  # one code per value across splits (audit may hold new ones)
            for v in self.variables:
                for value in split["values"].get(v, []):
                    if value not in self._values[v]:
                        self._values[v].append(value)
        self.ppl_file = Path(ppl) if ppl else None
        self._ppl: list[list[int]] | None = None
        self.lm_lines = read_lines(Path(lm_text), "task.lm_text", self.tokenizer) if lm_text else None
        self._answer_cache: dict[str, list[int]] = {}

    # -- reading and tokenizing ------------------------------------------------------------------

    def _load(self, split: str, path: Path) -> dict[str, Any]:
        """A split's tokenized rows: from the cache, or read, tokenized and cached."""
        where = f"task.{split}"
        if not path.is_file():
            raise DataError(f"{where}: file not found: {path}")
        key = self._label_fn_digest  # it may write the split's counterfactual rationales
        cached = cache_path(self.cache_dir, path, self._tokenizer_hash, self.document_separator, key)
        data = read_cache(cached)
        if data is not None:
            return data
        rows = read_rows(path, where)
        if rows and "prompt" not in rows[0] and {"question", "answer"} <= set(rows[0]):
            rows = gsm8k_rows(rows, path)
        if self.label_fn is not None and rows and "steps" in rows[0] and "counterfactual.steps" not in rows[0]:
            # counterfactual rationales: a mistake in one step, the answer it implies from label_fn
            rows = with_mistakes(rows, self.label_fn, self.tokenizer, str(path))
        data = self.encoder.tokenize(rows, path)
        write_cache(cached, data)
        return data

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
        for _split, data in self.splits.items():
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
            if s["cf_evidence"] is not None:  # the answers counterfactual evidence gives
                firsts |= {row[p] for row, p in zip(s["cf_evidence"], s["prompt_len"])}
        return tuple(sorted(firsts))

    @property
    def answer_length(self) -> int:
        return max(max(s["answer_len"]) for s in self.splits.values())

    @property
    def spans(self) -> tuple[str, ...]:
        data = self.splits["train"]
        docs = tuple(f"doc{j}" for j in range(len(data["documents"][0]))) if data["documents"] is not None else ()
        tools = ("tool", "result") if data["tool"] is not None else ()
        steps = tuple(f"step{j}" for j in range(self.min_steps))
        return tuple(data["spans"]) + docs + tools + steps

    @property
    def min_steps(self) -> int:
        """The steps every row of every split has (``step0`` .. are spans of all of them)."""
        return self._min_steps

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
            hint = self.column_hint("counterfactual_evidence")
            raise ConfigError(f"task 'text' has no counterfactual evidence{hint}")
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
        columns = {
            "perturbations": "paraphrase",
            "irrelevant": "irrelevant",
            "concepts": "concepts.<name>",
            "variables": "variables.<name>",
            "counterfactuals": "source.<name> + counterfactual_answer.<name>, or label_fn",
            "documents": "documents",
            "tool_calls": "tool_calls",
            "counterfactual_evidence": (
                "counterfactual.document (with documents), or tool_calls with counterfactual_result"
            ),
        }
        return f" (needs a {columns[feature]!r} column in {self.files['train']})" if feature in columns else ""

    def check_variables(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.variables:
                what = f"variable of task 'text' (a 'variables.{name}' column in {self.files['train']})"
                raise UnknownNameError(what, name, self.variables)
            if name not in self.splits["train"]["pairs"] and self.label_fn is None:
                raise ConfigError(
                    f"variable {name!r}: counterfactual answers need 'source.{name}' and "
                    f"'counterfactual_answer.{name}' columns in {self.files['train']}, or task.label_fn"
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
        length = max(
            data["prompt_len"][i] + data["answer_len"][i] - 1 for rows in [index, *sources.values()] for i in rows
        )
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
        return collate(
            data,
            index,
            length,
            pad_id=self.pad_id,
            padding_side=self.padding_side,
            values=self._values,
            concept_values=self.splits["train"]["concept_values"],
            min_steps=self.min_steps,
        )

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

    def _pad_lines(self, lines: list[list[int]]) -> Batch:
        return pad_lines(lines, self.pad_id, self.padding_side)

    def perplexity_batches(self, batch_size: int) -> list[Batch] | None:
        """Batches of the held-out plain text (``ppl``), for ``val/ppl``."""
        if self.ppl_file is None:
            return None
        if self._ppl is None:
            self._ppl = read_lines(self.ppl_file, "task.ppl", self.tokenizer)
        return [self._pad_lines(self._ppl[i : i + batch_size]) for i in range(0, len(self._ppl), batch_size)]

    # -- the causal model ------------------------------------------------------------------------

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        answers, _ = self._answers_from_codes(variables)
        return answers[:, 0]

    def _answers_from_codes(self, codes: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.label_fn is None:
            raise ConfigError(
                "counterfactual answers from variables need task.label_fn (or explicit source.<name> columns)"
            )
        B = next(iter(codes.values())).shape[0]
        answers = []
        for b in range(B):
            values = {v: json.loads(self._values[v][int(codes[v][b])]) for v in self.variables}
            answer = str(self.label_fn(values))
            if answer not in self._answer_cache:
                self._answer_cache[answer] = self.encoder.answer_tokens(answer, "x", f"label_fn({values})")
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
            raise ConfigError(
                "label_fn gave a counterfactual answer of another token length than the answer "
                "(teacher forcing needs one length)"
            )
        device = base["input_ids"].device
        return pad_right(ids, A, 0).to(device), pad_right(mask, A, False).to(device)

    def explicit_pairs(self, batch: Batch, variables: Sequence[str]) -> Pairs | None:
        if not variables or not all(f"pair.{v}/input_ids" in batch for v in variables):
            return None
        sources = {
            v: {k.split("/", 1)[1]: t for k, t in batch.items() if k.startswith(f"pair.{v}/")} for v in variables
        }
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
        inputs = [
            data["paraphrase"][i]
            + data["tokens"][i][data["prompt_len"][i] : data["prompt_len"][i] + data["answer_len"][i] - 1]
            for i in index
        ]
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
        perturbed |= {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "answer_pos": answer_pos.to(device),
        }
        return perturbed, source.to(device)

    def paraphrased_rationale(self, batch: Batch) -> Batch:
        """Each row with its rationale paraphrased (``rationale_paraphrase``), padded on the task's
        side: ``input_ids``, ``attention_mask``, ``answer_pos`` (the answer read after the
        paraphrase)."""
        data = self.splits[self._split_of(batch)]
        if data.get("steps_paraphrase") is None:
            raise ConfigError(
                f"task 'text' has no rationale paraphrases (a 'rationale_paraphrase' column in {data['path']})"
            )
        rows = [data["steps_paraphrase"][i] for i in batch["row"].tolist()]
        inputs = [tokens[: p + data["answer_len"][i] - 1] for (tokens, p), i in zip(rows, batch["row"].tolist())]
        T = max(len(x) for x in inputs)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        answer_pos = torch.zeros_like(batch["answer_pos"].cpu())
        for b, ((_, p), x) in enumerate(zip(rows, inputs)):
            shift = T - len(x) if self.padding_side == "left" else 0
            ids[b, shift : shift + len(x)] = torch.tensor(x)
            mask[b, shift : shift + len(x)] = 1
            answer_pos[b] = shift + p - 1 + (batch["answer_pos"][b].cpu() - batch["answer_pos"][b, :1].cpu())
        device = batch["input_ids"].device
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "answer_pos": answer_pos.to(device)}

    def perturb(self, batch: Batch, generator: torch.Generator) -> Tensor | None:
        return None  # paraphrases change lengths; position-aligned perturbations are not defined

    @property
    def provides(self) -> frozenset[str]:
        """From the file's columns: ``paraphrase``, ``irrelevant``, ``concepts.*``, ``documents``,
        ``tool_calls``, ``steps`` (a rationale), and counterfactual evidence (documents, tool
        results, or ``counterfactual_steps``)."""
        data = self.splits["train"]
        kinds = {"aligned_perturbations"} if data["paraphrase"] is not None else set()
        kinds |= {"irrelevant"} if data["irrelevant"] is not None else set()
        kinds |= {"documents"} if data["documents"] is not None else set()
        kinds |= {"tool_calls"} if data["tool"] is not None else set()
        kinds |= {"counterfactual_evidence"} if data["cf_evidence"] is not None else set()
        kinds |= {"steps"} if data.get("steps") is not None else set()
        kinds |= {"counterfactual_steps"} if data.get("cf_step") is not None else set()
        kinds |= {"rationale_paraphrase"} if data.get("steps_paraphrase") is not None else set()
        return frozenset(kinds | ({"concepts"} if self.concepts else set()))

    @staticmethod
    def _split_of(batch: Batch) -> str:
        return SPLITS[int(batch["split"][0])] if "split" in batch and len(batch["split"]) else "train"

    def token_name(self, token: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token))
