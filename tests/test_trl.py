"""LoFT in TRL's trainers (SFT, DPO, GRPO) on tiny random models: LoFT's optimizer, effective clipping and logs."""

import pytest
import torch
from datasets import Dataset

trl = pytest.importorskip("trl")

from loft_peft import LoftAdamW, LoftConfig  # noqa: E402
from loft_peft.optim import loft_factor_pairs  # noqa: E402
from loft_peft.trainer import unwrap_loft_optimizer  # noqa: E402

from .conftest import tiny_llama, tiny_text, tiny_tokenizer  # noqa: E402

MAX_NORM = 0.01  # below the tiny models' effective gradient norms: every step is clipped


def _common(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_grad_norm=MAX_NORM,
        bf16=False,
    )
    options.update(overrides)
    return options


def _moved(trainer):
    return [(h["loft_moved_B"], h["loft_moved_A"]) for h in trainer.state.log_history if "loft_moved_B" in h]


def _assert_trained_with_loft(trainer, steps):
    loft = unwrap_loft_optimizer(trainer.optimizer)
    assert isinstance(loft, LoftAdamW)
    expected = [(1.0, 0.0), (0.0, 1.0)] * steps
    assert _moved(trainer) == expected[:steps]  # alternation: B, A, B, ...
    norms = [h["grad_norm"] for h in trainer.state.log_history if "loft_moved_B" in h]
    assert all(n > MAX_NORM for n in norms)  # the logged norm is the effective one, before clipping
    pairs = loft_factor_pairs(trainer.model)
    assert pairs and all(torch.count_nonzero(b) > 0 for b, _ in pairs)  # B started at zero and moved


def test_sft_trainer_with_loft_config_trains_loft(tmp_path):
    from loft_peft.trl import LoftSFTTrainer

    dataset = Dataset.from_dict({"text": tiny_text(12, 10)})
    trainer = LoftSFTTrainer(
        model=tiny_llama(0),
        args=trl.SFTConfig(**_common(tmp_path), max_length=16),
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=LoftConfig(r=4),
    )
    trainer.train()
    _assert_trained_with_loft(trainer, 3)


def test_plain_sft_trainer_with_loft_config_warns_that_it_trains_lora(tmp_path):
    dataset = Dataset.from_dict({"text": tiny_text(4, 10)})
    trainer = trl.SFTTrainer(
        model=tiny_llama(0),
        args=trl.SFTConfig(**_common(tmp_path, max_steps=1), max_length=16),
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=LoftConfig(r=4),
    )
    with pytest.warns(UserWarning, match="LoRA with alpha = r, not LoFT"):
        trainer.train()


def test_dpo_trainer_with_loft_config_trains_loft(tmp_path):
    from loft_peft.trl import LoftDPOTrainer

    prompts, chosen, rejected = tiny_text(8, 4, seed=1), tiny_text(8, 4, seed=2), tiny_text(8, 4, seed=3)
    dataset = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    trainer = LoftDPOTrainer(
        model=tiny_llama(0),
        args=trl.DPOConfig(**_common(tmp_path), max_length=16),
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=LoftConfig(r=4),
    )
    trainer.train()
    _assert_trained_with_loft(trainer, 3)


def test_grpo_trainer_with_loft_config_trains_loft(tmp_path):
    from loft_peft.trl import LoftGRPOTrainer

    def reward_many_words(completions, **kwargs):
        # A toy reward that differs between completions (so that GRPO's advantages, and the gradients, are not 0).
        return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions]

    dataset = Dataset.from_dict({"prompt": tiny_text(8, 4, seed=4)})
    trainer = LoftGRPOTrainer(
        model=tiny_llama(0),
        reward_funcs=reward_many_words,
        args=trl.GRPOConfig(
            **_common(tmp_path, max_steps=2, per_device_train_batch_size=4), num_generations=4,
            max_completion_length=6, use_vllm=False,
            temperature=1.0,
        ),
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=LoftConfig(r=4),
    )
    trainer.train()
    _assert_trained_with_loft(trainer, 2)


def test_trainable_token_indices_from_trl_train_their_rows_with_adamw(tmp_path):
    # TRL sets peft_config.trainable_token_indices when a chat template adds tokens; LoftConfig has the field.
    from loft_peft.trl import LoftSFTTrainer

    config = LoftConfig(r=4, trainable_token_indices=[5, 6])
    dataset = Dataset.from_dict({"text": tiny_text(8, 10)})
    trainer = LoftSFTTrainer(
        model=tiny_llama(0),
        args=trl.SFTConfig(**_common(tmp_path, max_steps=2), max_length=16),
        train_dataset=dataset,
        processing_class=tiny_tokenizer(),
        peft_config=config,
    )
    deltas = [p for n, p in trainer.model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(deltas) == 1 and deltas[0].shape[0] == 2
    trainer.train()
    loft = unwrap_loft_optimizer(trainer.optimizer)
    plain = [p for g in loft.param_groups if not g["loft"] for p in g["params"]]
    assert any(p is deltas[0] for p in plain)  # the rows are a plain parameter: AdamW
    assert torch.count_nonzero(deltas[0]) > 0
