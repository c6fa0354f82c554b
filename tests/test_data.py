"""Fast tests of text loading, packing and splitting, with a word-level tokenizer built in memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loft_peft.data import build_lm_datasets, load_text_dataset, perplexity

N_WORDS = 1000


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that maps the word ``t<i>`` to id ``i + 1``, so token ids reveal their position in the text."""
    vocab = {"[UNK]": 0, **{f"t{i}": i + 1 for i in range(N_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def _write_sequence(path: Path, n_words: int = N_WORDS, words_per_line: int = 7) -> Path:
    """Write ``t0 t1 ... t<n_words-1>`` over lines of ``words_per_line`` words."""
    words = [f"t{i}" for i in range(n_words)]
    lines = [" ".join(words[i:i + words_per_line]) for i in range(0, n_words, words_per_line)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def sequence_file(tmp_path: Path) -> Path:
    return _write_sequence(tmp_path / "sequence.txt")


@pytest.fixture
def raw(sequence_file: Path) -> Dataset:
    return load_text_dataset(data_files=sequence_file)


def _all_blocks(*datasets: Dataset) -> list[list[int]]:
    return [ids for ds in datasets for ids in ds["input_ids"]]


def test_packed_blocks_have_exact_length(tokenizer, raw):
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=16, eval_fraction=0.2)
    for ds in (train, evaluation):
        for column in ("input_ids", "attention_mask", "labels"):
            assert all(len(row) == 16 for row in ds[column]), column


def test_labels_equal_input_ids(tokenizer, raw):
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=16, eval_fraction=0.2)
    for ds in (train, evaluation):
        assert list(ds["labels"]) == list(ds["input_ids"])
        assert all(set(mask) == {1} for mask in ds["attention_mask"])


def test_packing_drops_only_the_tail_and_keeps_token_order(tokenizer, raw):
    block_size = 30
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=block_size, eval_fraction=0.1)
    blocks = sorted(_all_blocks(train, evaluation))
    # One packing batch here, so exactly the trailing N_WORDS % block_size tokens are dropped.
    assert len(blocks) == N_WORDS // block_size
    expected = [list(range(1 + i, 1 + i + block_size)) for i in range(0, len(blocks) * block_size, block_size)]
    assert blocks == expected


def test_lines_are_concatenated_across_row_boundaries(tokenizer, raw):
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.1)
    # Lines hold 7 words, so 10-token blocks must span line boundaries without any inserted tokens.
    assert all(block == list(range(block[0], block[0] + 10)) for block in _all_blocks(train, evaluation))


def test_no_special_tokens_are_inserted(tokenizer, raw):
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.1)
    assert all(0 not in block for block in _all_blocks(train, evaluation))


def test_split_sizes_follow_eval_fraction(tokenizer, raw):
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.2)
    assert (len(train), len(evaluation)) == (80, 20)


def test_eval_size_rounds_up(tokenizer, raw):
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.005)
    assert (len(train), len(evaluation)) == (99, 1)


def test_train_and_eval_blocks_are_disjoint(tokenizer, raw):
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.3)
    train_starts = {block[0] for block in train["input_ids"]}
    eval_starts = {block[0] for block in evaluation["input_ids"]}
    assert not train_starts & eval_starts
    assert len(train_starts | eval_starts) == 100


def test_same_seed_gives_same_split(tokenizer, raw):
    first = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.2, seed=3)
    second = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.2, seed=3)
    for a, b in zip(first, second):
        assert list(a["input_ids"]) == list(b["input_ids"])


def test_different_seeds_give_different_splits(tokenizer, raw):
    _, eval_a = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.2, seed=0)
    _, eval_b = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.2, seed=1)
    assert list(eval_a["input_ids"]) != list(eval_b["input_ids"])


def test_max_blocks_truncate_each_split(tokenizer, raw):
    full_train, full_eval = build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.2)
    train, evaluation = build_lm_datasets(
        tokenizer, raw, block_size=10, eval_fraction=0.2, max_train_blocks=7, max_eval_blocks=3
    )
    assert (len(train), len(evaluation)) == (7, 3)
    assert list(train["input_ids"]) == list(full_train["input_ids"])[:7]
    assert list(evaluation["input_ids"]) == list(full_eval["input_ids"])[:3]


def test_max_blocks_larger_than_split_keeps_everything(tokenizer, raw):
    train, evaluation = build_lm_datasets(
        tokenizer, raw, block_size=10, eval_fraction=0.2, max_train_blocks=10_000, max_eval_blocks=10_000
    )
    assert (len(train), len(evaluation)) == (80, 20)


def test_long_rows_waste_less_than_one_block_per_batch(tokenizer, tmp_path):
    # Rows longer than a block: each packing batch drops under one block, and batches hold about 100 blocks.
    path = tmp_path / "long.jsonl"
    words = [f"t{i}" for i in range(N_WORDS)]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(20):
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    raw = load_text_dataset(data_files=path)
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=64, eval_fraction=0.1)
    total_tokens = 20 * N_WORDS
    assert (len(train) + len(evaluation)) * 64 >= total_tokens * 0.98


@pytest.mark.parametrize("block_size", [0, 1, -4, 2.5, True])
def test_invalid_block_size_is_rejected(tokenizer, raw, block_size):
    with pytest.raises(ValueError, match="block_size"):
        build_lm_datasets(tokenizer, raw, block_size=block_size, eval_fraction=0.2)


@pytest.mark.parametrize("eval_fraction", [0, 0.0, 1, 1.0, -0.1, 1.5])
def test_invalid_eval_fraction_is_rejected(tokenizer, raw, eval_fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
        build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=eval_fraction)


@pytest.mark.parametrize("name", ["max_train_blocks", "max_eval_blocks"])
def test_non_positive_max_blocks_is_rejected(tokenizer, raw, name):
    with pytest.raises(ValueError, match=name):
        build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.2, **{name: 0})


def test_text_too_short_for_a_split_is_rejected(tokenizer, tmp_path):
    raw = load_text_dataset(data_files=_write_sequence(tmp_path / "short.txt", n_words=15))
    with pytest.raises(ValueError, match="too few"):
        build_lm_datasets(tokenizer, raw, block_size=10, eval_fraction=0.2)


def test_missing_text_column_is_rejected(tokenizer):
    raw = Dataset.from_dict({"body": ["t1 t2 t3"]})
    with pytest.raises(ValueError, match="'text'"):
        build_lm_datasets(tokenizer, raw, block_size=2, eval_fraction=0.5)


def test_dataset_dict_is_rejected(tokenizer, raw):
    with pytest.raises(TypeError, match="datasets.Dataset"):
        build_lm_datasets(tokenizer, DatasetDict(train=raw), block_size=10, eval_fraction=0.2)


def test_missing_file_error_names_the_path(tmp_path, sequence_file):
    missing = tmp_path / "nowhere" / "absent.txt"
    with pytest.raises(FileNotFoundError, match="absent.txt") as info:
        load_text_dataset(data_files=[sequence_file, missing])
    assert str(missing) in str(info.value)


def test_missing_file_is_reported_before_the_extension_is_checked(tmp_path):
    missing = tmp_path / "absent.xyz"
    with pytest.raises(FileNotFoundError, match="absent.xyz"):
        load_text_dataset(data_files=missing)


def test_unknown_extension_error_names_it(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.csv"):
        load_text_dataset(data_files=path)


def test_mixed_text_and_json_files_are_rejected(tmp_path, sequence_file):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "t1"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mixes"):
        load_text_dataset(data_files=[sequence_file, path])


@pytest.mark.parametrize("kwargs", [{}, {"data_files": "a.txt", "dataset_name": "some/dataset"}])
def test_exactly_one_source_is_required(kwargs):
    with pytest.raises(ValueError, match="exactly one"):
        load_text_dataset(**kwargs)


def test_markdown_loads_one_row_per_line_with_line_breaks(tmp_path):
    path = tmp_path / "play.md"
    path.write_text("# Title\n\n**HAMLET**  \nTo be, or not to be.\n", encoding="utf-8")
    raw = load_text_dataset(data_files=path)
    assert list(raw["text"]) == ["# Title\n", "\n", "**HAMLET**  \n", "To be, or not to be.\n"]
    assert "".join(raw["text"]) == path.read_text(encoding="utf-8")


def test_text_files_load_in_the_given_order(tmp_path):
    first, second = tmp_path / "b.txt", tmp_path / "a.txt"
    first.write_text("first\n", encoding="utf-8")
    second.write_text("second\n", encoding="utf-8")
    raw = load_text_dataset(data_files=[first, second])
    assert list(raw["text"]) == ["first\n", "second\n"]


def test_text_column_is_renamed_for_plain_text(sequence_file):
    raw = load_text_dataset(data_files=str(sequence_file), text_column="content")
    assert raw.column_names == ["content"]


def test_json_lines_load_with_their_text_column(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(0, N_WORDS, 10):
            f.write(json.dumps({"id": i, "body": " ".join(f"t{j}" for j in range(i, i + 10))}) + "\n")
    raw = load_text_dataset(data_files=path, text_column="body")
    assert len(raw) == N_WORDS // 10
    train, evaluation = build_lm_datasets(tokenizer, raw, block_size=20, eval_fraction=0.1, text_column="body")
    assert train.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(train) + len(evaluation) == N_WORDS // 20


def test_json_missing_text_column_is_rejected(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"body": "t1"}]), encoding="utf-8")
    with pytest.raises(ValueError, match="'text'"):
        load_text_dataset(data_files=path)


def test_perplexity_is_exp_of_loss():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))


def test_perplexity_overflow_gives_inf():
    assert perplexity(1e6) == math.inf
    assert perplexity(math.inf) == math.inf
    assert math.isnan(perplexity(math.nan))
