"""The ``text`` task: examples from local JSONL, CSV or Parquet files, tokenized by a Hugging Face
tokenizer, so every objective and audit runs on language-model data.

``files`` reads the files, the tokenizer and the tokenized cache; ``encoding`` turns rows into
tokens; ``collate`` pads them into batches; ``task`` is the ``TextTask`` (its columns and options
are described there).
"""

from faithful_train.tasks.text.task import TextTask

__all__ = ["TextTask"]
