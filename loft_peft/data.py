"""Causal-language-modelling data: load text with the ``datasets`` library, tokenise, pack into blocks, split.

The recipe is the one of Hugging Face's ``run_clm`` example: tokenise every row, concatenate the token streams,
cut them into blocks of exactly ``block_size`` tokens (the tail that does not fill a block is dropped, once per
packing batch of about a hundred blocks), and use the block itself as its labels (the model shifts them by one
internally). The held-out split is taken over blocks, after packing, so no block straddles the train/eval boundary.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from datasets import Dataset, load_dataset

_BUILDER_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
}

# Packing works batch by batch and each batch drops its own tail (under one block). Sizing batches to hold about
# this many blocks keeps that waste near 0.5% whatever the row length, while each batch's token list stays small.
_BLOCKS_PER_PACK_BATCH = 100

DataFiles = str | os.PathLike | Sequence[str | os.PathLike]


def _as_paths(data_files: DataFiles) -> list[Path]:
    """Turn one path or a sequence of paths into a non-empty list of ``Path``.

    Raises:
        ValueError: If the sequence is empty.
    """
    if isinstance(data_files, (str, os.PathLike)):
        return [Path(data_files)]
    paths = [Path(f) for f in data_files]
    if not paths:
        raise ValueError("data_files is empty; pass at least one .txt, .md, .json or .jsonl file.")
    return paths


def _builder_for(paths: Sequence[Path]) -> str:
    """Pick the ``datasets`` builder (``"text"`` or ``"json"``) that reads every one of ``paths``.

    Raises:
        ValueError: If a file has an unsupported extension, or text and JSON files are mixed.
    """
    builders = set()
    for path in paths:
        suffix = path.suffix.lower()
        if suffix not in _BUILDER_BY_SUFFIX:
            raise ValueError(
                f"Unsupported data file extension '{suffix}' for {path}; "
                f"expected one of {sorted(_BUILDER_BY_SUFFIX)}."
            )
        builders.add(_BUILDER_BY_SUFFIX[suffix])
    if len(builders) > 1:
        raise ValueError("data_files mixes plain-text and JSON files; load them separately.")
    return builders.pop()


def _check_column(dataset: Dataset, text_column: str) -> None:
    """Raise ``ValueError`` if ``dataset`` has no column named ``text_column``."""
    if text_column not in dataset.column_names:
        raise ValueError(
            f"The dataset has no column '{text_column}'; its columns are {dataset.column_names}. "
            "Pass the right text_column."
        )


def load_text_dataset(
    *,
    data_files: DataFiles | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    split: str = "train",
) -> Dataset:
    """Load raw text as a ``datasets.Dataset`` from local files or from a dataset on the Hugging Face Hub.

    Local ``.txt``/``.md`` files are read with the ``text`` builder, one row per line with its line break kept (so
    verse and paragraphs survive concatenation); ``.json``/``.jsonl`` files are read with the ``json`` builder.

    Args:
        data_files: One local file or a sequence of them, all plain text or all JSON. Exclusive with
            ``dataset_name``.
        dataset_name: Name of a dataset on the Hub (or a local dataset folder). Exclusive with ``data_files``.
        dataset_config: Configuration name of ``dataset_name``, if it has several.
        text_column: Column that holds the text. Plain-text files always produce ``"text"``, which is renamed to
            this name when it differs.
        split: Split to load; for local files this is only the name the rows are filed under.

    Returns:
        The dataset, with at least the column ``text_column``.

    Raises:
        FileNotFoundError: If a local file does not exist (checked before anything is read).
        ValueError: If both or neither of ``data_files`` and ``dataset_name`` are given, a file extension is not
            supported, or the text column is missing.
    """
    if (data_files is None) == (dataset_name is None):
        raise ValueError("Pass exactly one of data_files (local files) and dataset_name (a Hub dataset).")

    if dataset_name is not None:
        dataset = load_dataset(dataset_name, dataset_config, split=split)
        _check_column(dataset, text_column)
        return dataset

    paths = _as_paths(data_files)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Data file(s) not found: {', '.join(missing)}")
    empty = [str(p) for p in paths if is_empty_file(p)]
    if empty:
        raise ValueError(f"Data file(s) empty: {', '.join(empty)}")
    builder = _builder_for(paths)
    files = {split: [str(p) for p in paths]}
    try:
        with _quiet_loading():
            if builder == "text":
                dataset = load_dataset("text", data_files=files, split=split, keep_linebreaks=True)
            else:
                dataset = load_dataset("json", data_files=files, split=split)
        if builder == "text" and text_column != "text":
            dataset = dataset.rename_column("text", text_column)
    except Exception as error:  # datasets wraps a parse error in a long DatasetGenerationError chain
        cause = error.__cause__ or error
        raise ValueError(
            f"Could not read {', '.join(map(str, paths))} as {builder}: {type(cause).__name__}: "
            f"{' '.join(str(cause).split())[:300]}"
        ) from error
    _check_column(dataset, text_column)
    return dataset


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bar for quick steps (reading local files, packing), and a parse error reported once, by the
    caller, not also logged by the ``datasets`` builder."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def is_empty_file(path: Path) -> bool:
    """True for a file of zero bytes or of whitespace only (read only when it is small)."""
    size = path.stat().st_size
    if size == 0:
        return True
    if size > 1 << 20:
        return False
    return not path.read_bytes().strip()


def _check_block_args(block_size: int, eval_fraction: float, max_train_blocks: int | None,
                      max_eval_blocks: int | None) -> None:
    """Validate the numeric arguments of :func:`build_lm_datasets`.

    Raises:
        ValueError: If any argument is out of range.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 (a block needs an input and a next token); "
                         f"got {block_size!r}.")
    if not isinstance(eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be strictly between 0 and 1; got {eval_fraction!r}.")
    for name, value in (("max_train_blocks", max_train_blocks), ("max_eval_blocks", max_eval_blocks)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive integer; got {value!r}.")


class _Tokenize:
    """Batched tokenisation of one text column, as a picklable callable for ``Dataset.map``."""

    def __init__(self, tokenizer: Any, text_column: str) -> None:
        self.tokenizer = tokenizer
        self.text_column = text_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        # No special tokens: rows are often single lines of one continuous text, and a BOS/EOS on every line
        # would teach the model a token that never occurs there. verbose=False silences the warning about rows
        # longer than the model's context, which is moot because rows are packed into blocks afterwards.
        encoded = self.tokenizer(
            batch[self.text_column],
            add_special_tokens=False,
            return_attention_mask=True,
            return_token_type_ids=False,
            verbose=False,
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _group_texts(batch: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenate a batch of token lists and cut it into blocks of ``block_size``, dropping the tail."""
    concatenated = {key: list(chain.from_iterable(batch[key])) for key in batch}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    blocks = {
        key: [tokens[start:start + block_size] for start in range(0, total, block_size)]
        for key, tokens in concatenated.items()
    }
    blocks["labels"] = [list(block) for block in blocks["input_ids"]]
    return blocks


def _token_count(tokenized: Dataset) -> int:
    """Total number of tokens in the ``input_ids`` column, read from the Arrow list lengths without copying."""
    lengths = pc.list_value_length(tokenized.data.table.column("input_ids"))
    return int(pc.sum(lengths).as_py() or 0)


def _pack_batch_rows(n_rows: int, n_tokens: int, block_size: int) -> int:
    """Rows per packing batch so that a batch holds about ``_BLOCKS_PER_PACK_BATCH`` blocks."""
    mean_row_tokens = max(n_tokens / max(n_rows, 1), 1.0)
    return max(1, math.ceil(_BLOCKS_PER_PACK_BATCH * block_size / mean_row_tokens))


def build_lm_datasets(
    tokenizer: Any,
    raw_dataset: Dataset,
    *,
    block_size: int,
    eval_fraction: float,
    seed: int = 0,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
    text_column: str = "text",
) -> tuple[Dataset, Dataset]:
    """Tokenise a text dataset, pack it into fixed-length blocks and split the blocks into train and eval sets.

    Everything is kept in memory and nothing is written to the ``datasets`` cache.

    Args:
        tokenizer: A Hugging Face tokenizer (fast tokenizers are much quicker); called without special tokens.
        raw_dataset: Dataset with a text column, e.g. from :func:`load_text_dataset`.
        block_size: Tokens per block; every returned example has exactly this many.
        eval_fraction: Fraction of the blocks held out for evaluation, strictly between 0 and 1.
        seed: Seed of the shuffled train/eval split; the same seed gives the same split.
        max_train_blocks: Keep at most this many training blocks (the first ones of the shuffled split).
        max_eval_blocks: Keep at most this many evaluation blocks.
        text_column: Column of ``raw_dataset`` holding the text.

    Returns:
        ``(train, eval)`` datasets with columns ``input_ids``, ``attention_mask`` (all ones) and ``labels``
        (equal to ``input_ids``).

    Raises:
        TypeError: If ``raw_dataset`` is not a ``datasets.Dataset``.
        ValueError: If an argument is out of range, the text column is missing, or the text is too short to give
            at least one block on each side of the split.
    """
    _check_block_args(block_size, eval_fraction, max_train_blocks, max_eval_blocks)
    if not isinstance(raw_dataset, Dataset):
        raise TypeError(f"raw_dataset must be a datasets.Dataset (one split); got {type(raw_dataset).__name__}.")
    _check_column(raw_dataset, text_column)

    tokenized = raw_dataset.map(
        _Tokenize(tokenizer, text_column),
        batched=True,
        remove_columns=raw_dataset.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc="Tokenising",
    )
    n_tokens = _token_count(tokenized)
    with _quiet_loading():  # packing takes a fraction of tokenising's time: one bar for the two
        blocks = tokenized.map(
            _group_texts,
            fn_kwargs={"block_size": block_size},
            batched=True,
            batch_size=_pack_batch_rows(len(tokenized), n_tokens, block_size),
            keep_in_memory=True,
            load_from_cache_file=False,
        )
    n_eval = math.ceil(len(blocks) * eval_fraction)
    if len(blocks) - n_eval < 1:
        raise ValueError(
            f"The text ({n_tokens} tokens) packs into only {len(blocks)} block(s) of {block_size} tokens, too few "
            f"to hold out {eval_fraction:.0%} for evaluation and keep a training block; use more text or a smaller "
            "block_size."
        )
    split = blocks.train_test_split(test_size=n_eval, seed=seed, keep_in_memory=True)
    train, evaluation = split["train"], split["test"]
    if max_train_blocks is not None and len(train) > max_train_blocks:
        train = train.select(range(max_train_blocks), keep_in_memory=True)
    if max_eval_blocks is not None and len(evaluation) > max_eval_blocks:
        evaluation = evaluation.select(range(max_eval_blocks), keep_in_memory=True)
    return train, evaluation


def perplexity(loss: float) -> float:
    """Return ``exp(loss)``, the perplexity of a mean token cross-entropy, or ``inf`` where that overflows.

    Args:
        loss: Mean cross-entropy in nats per token.

    Returns:
        The perplexity; ``inf`` for losses too large to exponentiate, ``nan`` for a ``nan`` loss.
    """
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
