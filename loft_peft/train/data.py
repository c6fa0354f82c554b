"""The data of a ``loft-train`` run: text packed into blocks (:mod:`loft_peft.data`) or preprocessed images."""

from __future__ import annotations

from .config import ConfigError, TrainConfig, template_fields



# ====================================================================================================== data
def _load_raw(config: TrainConfig, split: str, files: list[str] | None = None):
    """The records of ``split``, or of the local ``files`` when given (read as data_files would be)."""
    from datasets import load_dataset

    if files is not None:
        import dataclasses

        config = dataclasses.replace(config, data_files=list(files), dataset_name=None)

    if config.task == "image-classification":
        if config.dataset_name is not None:
            return load_dataset(config.dataset_name, config.dataset_config, split=split)
        return load_dataset("imagefolder", data_files={split: list(config.data_files)}, split=split)
    if config.text_template:
        # Records that a template turns into text: read them whole, the template checks their fields.
        if config.dataset_name is not None:
            return load_dataset(config.dataset_name, config.dataset_config, split=split)
        return load_dataset("json", data_files={split: list(config.data_files)}, split=split)
    from ..data import load_text_dataset

    if config.dataset_name is not None:
        return load_text_dataset(dataset_name=config.dataset_name, dataset_config=config.dataset_config,
                                 text_column=config.text_column, split=split)
    files = config.data_files
    if files is None:
        from ..assets import shakespeare_files

        files = [str(p) for p in shakespeare_files()]
    return load_text_dataset(data_files=files, text_column=config.text_column, split=split)


def _apply_template(config: TrainConfig, raw):
    if not config.text_template:
        return raw
    template = config.text_template
    missing = [name for name in template_fields(template) if name not in raw.column_names]
    if missing:
        raise ConfigError(f"text_template uses field(s) {missing} that the data lacks; its fields are "
                          f"{raw.column_names}")
    return raw.map(lambda record: {"text": template.format(**record)}, remove_columns=raw.column_names,
                   keep_in_memory=True, load_from_cache_file=False, desc="Applying text_template")


def _all_blocks(tokenizer, raw, config: TrainConfig):
    """Every block of ``raw``: ``build_lm_datasets`` always splits, so pack with an even split and put it back."""
    from datasets import concatenate_datasets

    from ..data import build_lm_datasets

    first, second = build_lm_datasets(tokenizer, raw, block_size=config.block_size, eval_fraction=0.5,
                                      seed=config.seed, text_column="text" if config.text_template
                                      else config.text_column)
    return concatenate_datasets([first, second])


def build_lm_data(config: TrainConfig, tokenizer):
    """``(train, eval)`` packed blocks for causal-LM training."""
    from ..data import build_lm_datasets

    raw = _apply_template(config, _load_raw(config, config.train_split))
    column = "text" if config.text_template else config.text_column
    if config.eval_data_files:
        train = _all_blocks(tokenizer, raw, config).shuffle(seed=config.seed)
        evaluation = held_out_blocks(config, tokenizer, config.eval_data_files)
        return _truncate(train, config.max_train_examples), evaluation
    if config.eval_split is None:
        return build_lm_datasets(tokenizer, raw, block_size=config.block_size, eval_fraction=config.eval_fraction,
                                 seed=config.seed, max_train_blocks=config.max_train_examples,
                                 max_eval_blocks=config.max_eval_examples, text_column=column)
    train = _all_blocks(tokenizer, raw, config).shuffle(seed=config.seed)
    evaluation = _all_blocks(tokenizer, _apply_template(config, _load_raw(config, config.eval_split)), config)
    return _truncate(train, config.max_train_examples), _truncate(evaluation, config.max_eval_examples)


def held_out_blocks(config: TrainConfig, tokenizer, files: list[str]):
    """The blocks of the local ``files`` (at most ``max_eval_examples``) for an evaluation: the same blocks whatever
    the run's seed, so that runs with different seeds are evaluated on the same text."""
    import dataclasses

    fixed = dataclasses.replace(config, seed=0)
    return _truncate(_all_blocks(tokenizer, _apply_template(fixed, _load_raw(fixed, "eval", files)), fixed),
                     config.max_eval_examples)


def _truncate(dataset, limit: int | None):
    return dataset if limit is None or len(dataset) <= limit else dataset.select(range(limit))


def build_image_data(config: TrainConfig, processor):
    """``(train, eval, label_names)`` with on-the-fly preprocessing by the model's image processor."""
    raw = _load_raw(config, config.train_split)
    for column in (config.image_column, config.label_column):
        if column not in raw.column_names:
            raise ConfigError(f"the dataset has no column {column!r}; its columns are {raw.column_names}")
    if config.eval_split is None:
        split = raw.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        train, evaluation = split["train"], split["test"]
    else:
        train, evaluation = raw, _load_raw(config, config.eval_split)
    feature = raw.features[config.label_column]
    names = list(feature.names) if hasattr(feature, "names") else [str(i) for i in range(max(raw[config.label_column]) + 1)]

    def transform(batch):
        images = [image.convert("RGB") for image in batch[config.image_column]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": list(pixels), "labels": list(batch[config.label_column])}

    train = _truncate(train, config.max_train_examples)
    evaluation = _truncate(evaluation, config.max_eval_examples)
    train, evaluation = train.with_transform(transform), evaluation.with_transform(transform)
    # Preprocessing runs lazily, inside training; try one example now so that bad data fails before anything runs.
    try:
        train[0]
    except Exception as err:  # noqa: BLE001 - whatever the image processor raises, it is the data's problem
        raise ConfigError(
            f"could not preprocess the first training example (image_column {config.image_column!r}, "
            f"label_column {config.label_column!r}): {type(err).__name__}: {err}"
        ) from err
    return train, evaluation, names


def accuracy(eval_prediction) -> dict[str, float]:
    import numpy as np

    logits = eval_prediction.predictions[0] if isinstance(eval_prediction.predictions, tuple) \
        else eval_prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_prediction.label_ids).mean())}


