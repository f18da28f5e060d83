"""The text task's files: rows of a local JSONL, CSV or Parquet file (through Hugging Face ``datasets``),
the tokenizer from a local directory, token ids of plain-text lines, and the tokenized cache of a split
(keyed by the file's and the tokenizer's hashes)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from faithful_train.errors import DataError, first_line

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CACHE_VERSION = 5  # bump when the cached format changes


def hash_file(path: Path) -> str:
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


def tokenizer_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(file.name.encode())
        digest.update(hash_file(file).encode())
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


def gsm8k_rows(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Rows of a GSM8K-format file (``question``; ``answer``: the solution's lines, then ``####``
    and the final answer) as the text task's: ``prompt``, ``steps`` (the solution's non-empty
    lines, as they are), ``conclusion`` ``####`` and ``answer`` (after it); other columns are kept."""
    out = []
    for r, row in enumerate(rows):
        where = f"{path} row {r} column 'answer'"
        solution = row.get("answer")
        if not isinstance(solution, str) or "####" not in solution:
            raise DataError(f"{where}: a GSM8K solution ends with '#### <answer>'; no '####' in {str(solution)[:60]!r}")
        body, final = solution.rsplit("####", 1)
        steps = [line.strip() for line in body.splitlines() if line.strip()]
        if not final.strip():
            raise DataError(f"{where}: nothing after '####' (the final answer)")
        if not steps:
            raise DataError(f"{where}: no solution lines before '####'")
        kept = {k: v for k, v in row.items() if k not in ("question", "answer")}
        out.append(
            kept | {"prompt": row.get("question"), "steps": steps, "conclusion": "####", "answer": final.strip()}
        )
    return out


def save_tokenizer(tokenizer: Any, out: Path) -> Path:
    """``save_pretrained`` into a temporary directory beside ``out/tokenizer``, then each file
    moved into place (``os.replace``): a reader never sees half a tokenizer."""
    import shutil
    import tempfile

    target = out / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tokenizer."))
    try:
        tokenizer.save_pretrained(tmp)
        for f in sorted(tmp.iterdir()):
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_lines(path: Path, where: str, tokenizer: Any) -> list[list[int]]:
    """Token ids of each non-empty line of a plain-text file."""
    if not path.is_file():
        raise DataError(f"{where}: file not found: {path}")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{where}: {path} has no text")
    return [tokenizer(line)["input_ids"] for line in lines]


def cache_path(cache_dir: Path, path: Path, tokenizer_digest: str, document_separator: str, extra: str = "") -> Path:
    """Where the tokenized ``path`` is cached: keyed by the cache version, the file's and the
    tokenizer's hashes, the document separator and ``extra`` (what else shaped the rows: the
    ``label_fn`` that wrote counterfactual rationales)."""
    key = f"{CACHE_VERSION}:{hash_file(path)}:{tokenizer_digest}:{document_separator!r}:{extra}"
    return cache_dir / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def callable_digest(spec: str, fn: Any) -> str:
    """A hash of a user function: its spec and its source (the spec alone when it has none)."""
    import inspect

    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        source = ""
    return hashlib.sha256(f"{spec}\n{source}".encode()).hexdigest()[:16]


def read_cache(path: Path) -> dict[str, Any] | None:
    """The cached tokenized split, or None when there is none or it cannot be read (a cache from
    another version: tokenize again)."""
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a cache from another version: tokenize again
            pass
    return None


def write_cache(path: Path, data: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError:  # an unwritable cache only costs the next run a re-tokenization
        pass
