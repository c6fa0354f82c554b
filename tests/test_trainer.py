"""The Trainer integration: effective-gradient clipping once per step, accumulation, exact resume, mixed precision."""

import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from loft_peft import LoftAdamW, LoftConfig, create_loft_optimizer
from loft_peft.optim import loft_factor_pairs
from loft_peft.optim.base import LoftOptimizerBase
from loft_peft.trainer import LoftCallback, LoftOptimizerFactory, LoftTrainer, unwrap_loft_optimizer

from .conftest import tiny_llama

MAX_NORM = 0.01  # far below the tiny model's effective gradient norms (about 0.1-0.3), so every step is clipped


def _dataset(n: int = 24, length: int = 16, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (n, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _loft_model(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
    return get_peft_model(tiny_llama(seed).to(dtype), LoftConfig(r=4, loft_dropout=dropout))


def _args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_grad_norm=MAX_NORM,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def _trainer(model, args, callbacks=(), dataset=None, **kwargs) -> Trainer:
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset if dataset is not None else _dataset(),
        optimizers=(create_loft_optimizer(model, lr=args.learning_rate), None),
        callbacks=list(callbacks),
        **kwargs,
    )


def _plain_norm(optimizer: LoftOptimizerBase) -> float:
    grads = [p.grad.detach().norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads)))


class GradientProbe(TrainerCallback):
    """At ``on_pre_optimizer_step``, the effective and plain norms of the gradients the optimizer will step on.

    Placed before ``LoftCallback`` it sees the gradients after the Trainer's own handling and before LoFT's clip;
    placed after it, the gradients the optimizer actually uses.
    """

    def __init__(self):
        self.effective: list[float] = []
        self.plain: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        loft = unwrap_loft_optimizer(optimizer)
        self.effective.append(float(loft.effective_grad_norm()))
        self.plain.append(_plain_norm(loft))


def _train_logs(trainer: Trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]


def _moved(trainer: Trainer) -> list[tuple[float, float]]:
    return [(h["loft_moved_B"], h["loft_moved_A"]) for h in _train_logs(trainer)]


def _factors(model) -> list[torch.Tensor]:
    return [p.detach().clone() for pair in loft_factor_pairs(model) for p in pair]


# ---------------------------------------------------------------------------------------------------------- clipping
def test_trainer_clips_the_effective_norm_once_and_never_the_plain_norm(tmp_path, monkeypatch):
    calls = []
    original = LoftOptimizerBase.clip_grad_norm_

    def counting_clip(self, max_norm):
        calls.append(max_norm)
        return original(self, max_norm)

    monkeypatch.setattr(LoftOptimizerBase, "clip_grad_norm_", counting_clip)
    before, after = GradientProbe(), GradientProbe()
    model = _loft_model()
    args = _args(tmp_path)
    trainer = _trainer(model, args, callbacks=[before, LoftCallback(), after])
    trainer.train()

    steps = 4
    assert calls == [MAX_NORM] * steps  # LoFT's clip ran once per optimizer step, with the Trainer's max_grad_norm
    # The Trainer did not clip: the plain norm reaching LoftCallback is still above max_grad_norm.
    assert min(before.plain) > 2 * MAX_NORM
    # LoFT clipped the effective norm to max_grad_norm; the plain norm ended up somewhere else.
    assert after.effective == pytest.approx([MAX_NORM] * steps, rel=1e-4)
    assert all(abs(p - MAX_NORM) > 0.1 * MAX_NORM for p in after.plain)
    # The logged grad_norm is the effective norm before clipping.
    assert [h["grad_norm"] for h in _train_logs(trainer)] == pytest.approx(before.effective, rel=1e-5)
    assert args.max_grad_norm == MAX_NORM  # the Trainer's arguments hold the user's value again


def test_max_grad_norm_zero_clips_nothing(tmp_path):
    before, after = GradientProbe(), GradientProbe()
    trainer = _trainer(_loft_model(), _args(tmp_path, max_grad_norm=0.0), callbacks=[before, LoftCallback(), after])
    trainer.train()
    assert after.effective == before.effective
    assert after.plain == before.plain
    assert [h["grad_norm"] for h in _train_logs(trainer)] == pytest.approx(before.effective, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- accumulation
def test_alternation_toggles_once_per_optimizer_step_under_accumulation(tmp_path):
    model = _loft_model()
    trainer = _trainer(model, _args(tmp_path, gradient_accumulation_steps=3), callbacks=[LoftCallback()])
    trainer.train()
    assert _moved(trainer) == [(1.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.0, 1.0)]
    loft = unwrap_loft_optimizer(trainer.optimizer)
    for b_param, _ in loft_factor_pairs(model):
        assert int(loft.state[b_param]["step"]) == 4  # 12 micro-batches, 4 optimizer steps


def test_accumulated_micro_batches_are_clipped_and_stepped_as_one_batch(tmp_path):
    runs = {}
    for accumulation in (1, 2):
        # float64: B has moved once from zero after the first step, and its ill-conditioned Gram matrix would amplify
        # fp32 rounding of the differently summed gradients to about 1e-4.
        model = _loft_model(dtype=torch.float64)
        args = _args(tmp_path / str(accumulation), per_device_train_batch_size=4 // accumulation,
                     gradient_accumulation_steps=accumulation, max_steps=3)
        trainer = _trainer(model, args, callbacks=[LoftCallback()])
        trainer.train()
        runs[accumulation] = ([h["grad_norm"] for h in _train_logs(trainer)], _factors(model))
    (norms_1, factors_1), (norms_2, factors_2) = runs[1], runs[2]
    assert min(norms_1) > MAX_NORM  # clipping was active
    assert norms_2 == pytest.approx(norms_1, rel=1e-9)
    for a, b in zip(factors_1, factors_2):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------- resume
def test_resume_equals_uninterrupted_run(tmp_path):
    def args(out):
        return _args(out, max_steps=6, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3,
                     lr_scheduler_type="linear")

    # Dropout makes the result depend on the restored RNG state as well as on the weights and optimizer state.
    model = _loft_model(seed=0, dropout=0.1)
    uninterrupted = _trainer(model, args(tmp_path / "a"), callbacks=[LoftCallback()])
    uninterrupted.train()
    assert min(h["grad_norm"] for h in _train_logs(uninterrupted)) > MAX_NORM  # clipping was on at every step
    expected = _factors(model)

    # A fresh process builds the same base model with a new adapter; scrambling the adapter shows that the
    # checkpoint's factors are what the resumed run starts from.
    resumed_model = _loft_model(seed=0, dropout=0.1)
    with torch.no_grad():
        for factor in (p for pair in loft_factor_pairs(resumed_model) for p in pair):
            factor.normal_()
    resumed = _trainer(resumed_model, args(tmp_path / "b"), callbacks=[LoftCallback()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    for want, got in zip(expected, _factors(resumed_model)):
        assert (got - want).abs().max().item() <= 1e-6
    assert _moved(resumed) == _moved(uninterrupted)  # steps 1-3 come from the checkpoint's log history


# -------------------------------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_trains_without_nan_and_close_to_fp32(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        model = _loft_model()
        trainer = _trainer(model, _args(tmp_path / precision, bf16=precision == "bf16"), callbacks=[LoftCallback()])
        trainer.train()
        if precision == "bf16":
            assert trainer.accelerator.native_amp and trainer.accelerator.mixed_precision == "bf16"
        logs = _train_logs(trainer)
        assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in logs)
        assert all(torch.isfinite(f).all() for f in _factors(model))
        losses[precision] = [h["loss"] for h in logs]
    # bf16 keeps 8 mantissa bits: losses agree to a few parts in a thousand.
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)


def _fp16_trainer_with_cpu_grad_scaler(model, args, callbacks, init_scale):
    """A Trainer on accelerate's fp16 path (GradScaler) on the CPU.

    accelerate enables fp16 autocast and its GradScaler only on accelerators; on the CPU it runs fp16 requests in fp32
    and creates no scaler. Giving the Accelerator torch's CPU GradScaler before ``train()`` runs the same code path as
    on a GPU: the scaled backward, ``unscale_`` inside ``clip_grad_norm_``, and ``scaler.step`` skipping overflowing steps.
    """
    trainer = _trainer(model, args, callbacks=callbacks)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    trainer.accelerator.native_amp = True
    return trainer


class PoisonStep(TrainerCallback):
    """Makes one factor's gradient non-finite during one optimizer step, as an fp16 overflow does."""

    def __init__(self, parameter: torch.Tensor, step: int):
        self.step, self.active = step, False
        parameter.register_hook(lambda grad: grad * math.inf if self.active else grad)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step == self.step


def test_fp16_overflow_skips_the_step_without_toggling_or_advancing_state(tmp_path):
    model = _loft_model()
    b_param = loft_factor_pairs(model)[0][0]
    trainer = _fp16_trainer_with_cpu_grad_scaler(
        model, _args(tmp_path, fp16=True), [LoftCallback(), PoisonStep(b_param, step=1)], init_scale=2.0**8
    )
    trainer.train()

    # Step 2 overflowed: the scaler skipped it, so nothing moved and the next step moves A, not B again.
    assert _moved(trainer) == [(1.0, 0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0)]
    loft = unwrap_loft_optimizer(trainer.optimizer)
    assert all(int(loft.state[b]["step"]) == 3 for b, _ in loft_factor_pairs(model))
    assert trainer.accelerator.scaler.get_scale() == 2.0**7  # halved once, for the one overflow
    assert all(torch.isfinite(f).all() for f in _factors(model))
    norms = [h["grad_norm"] for h in _train_logs(trainer)]
    assert not math.isfinite(norms[1]) and all(math.isfinite(n) for n in norms[:1] + norms[2:])


def test_a_nan_gradient_without_a_scaler_skips_the_step_and_is_logged_as_such(tmp_path):
    # bf16 / fp32 have no GradScaler: the LoFT optimizer skips the step itself, and the callback counts no move.
    model = _loft_model()
    b_param = loft_factor_pairs(model)[0][0]
    trainer = _trainer(model, _args(tmp_path), callbacks=[LoftCallback(), PoisonStep(b_param, step=1)])
    with pytest.warns(RuntimeWarning, match="this step was skipped"):
        trainer.train()
    assert _moved(trainer) == [(1.0, 0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 0.0)]
    norms = [h["grad_norm"] for h in _train_logs(trainer)]
    assert not math.isfinite(norms[1]) and all(math.isfinite(n) for n in norms[:1] + norms[2:])
    assert all(torch.isfinite(f).all() for f in _factors(model))


def test_fp16_clip_sees_unscaled_gradients(tmp_path):
    reference = _trainer(_loft_model(), _args(tmp_path / "fp32", max_steps=1), callbacks=[LoftCallback()])
    reference.train()
    scaled = _fp16_trainer_with_cpu_grad_scaler(
        _loft_model(), _args(tmp_path / "fp16", max_steps=1, fp16=True), [LoftCallback()], init_scale=2.0**12
    )
    scaled.train()
    assert scaled.accelerator.scaler.get_scale() == 2.0**12  # no overflow: the step ran
    # Had the clip seen scaled gradients, the norm would be 4096 times larger; fp16 autocast costs about 1e-3.
    assert _train_logs(scaled)[0]["grad_norm"] == pytest.approx(_train_logs(reference)[0]["grad_norm"], rel=2e-2)


# --------------------------------------------------------------------------------------------- wiring and misuse
def test_callback_rejects_a_trainer_without_a_loft_optimizer(tmp_path):
    model = _loft_model()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[LoftCallback()])
    with pytest.raises(TypeError, match="needs a LoFT optimizer"):
        trainer.train()


def test_loft_optimizer_built_from_the_trainers_name_groups_finds_its_pairs(tmp_path):
    # Trainer(optimizer_cls_and_kwargs=(LoftAdamW, ...)) hands LoftAdamW name-based groups (decay / no decay); the
    # factors' marks give it the pairs, so it trains LoFT, not plain AdamW.
    trainer = Trainer(model=_loft_model(), args=_args(tmp_path), train_dataset=_dataset(),
                      optimizer_cls_and_kwargs=(LoftAdamW, {"lr": 1e-2}), callbacks=[LoftCallback()])
    trainer.train()
    loft = unwrap_loft_optimizer(trainer.optimizer)
    assert sum(len(g["params"]) for g in loft.param_groups if g["loft"]) == 2 * len(loft_factor_pairs(trainer.model))
    assert _moved(trainer) == [(1.0, 0.0), (0.0, 1.0)] * 2


def test_optimizer_factory_gives_the_trainer_a_loft_optimizer(tmp_path):
    model = _loft_model()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset(),
                      optimizer_cls_and_kwargs=(LoftOptimizerFactory, {"lr": 1e-2, "variant": "simple"}),
                      callbacks=[LoftCallback()])
    trainer.train()
    loft = unwrap_loft_optimizer(trainer.optimizer)
    assert isinstance(loft, LoftAdamW) and loft.param_groups[0]["variant"] == "simple"
    assert _moved(trainer) == [(1.0, 0.0), (0.0, 1.0)]


class LogRecorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_loft_trainer_builds_the_optimizer_from_its_arguments_and_reports_to_earlier_callbacks(tmp_path):
    # A user callback runs before LoftCallback here, as reporting integrations from report_to always do.
    recorder = LogRecorder()
    model = _loft_model()
    trainer = LoftTrainer(model=model, args=_args(tmp_path, learning_rate=3e-3, weight_decay=0.1),
                          train_dataset=_dataset(), callbacks=[recorder],
                          loft_optimizer_kwargs={"variant": "simple"})
    trainer.train()
    loft = unwrap_loft_optimizer(trainer.optimizer)
    factor_group = next(g for g in loft.param_groups if g["loft"])
    assert (factor_group["lr"], factor_group["weight_decay"], factor_group["variant"]) == (3e-3, 0.1, "simple")
    seen = [log for log in recorder.logs if "loss" in log]
    assert [(log["loft_moved_B"], log["loft_moved_A"]) for log in seen] == _moved(trainer)
    assert [log["grad_norm"] for log in seen] == [h["grad_norm"] for h in _train_logs(trainer)]


# ------------------------------------------------------------------------------------ the guard in every Trainer
def test_trainer_without_loft_callback_warns_and_clips_the_effective_norm_itself(tmp_path):
    runs = {}
    for name, callbacks in (("callback", [LoftCallback()]), ("forgotten", [])):
        model = _loft_model()
        trainer = _trainer(model, _args(tmp_path / name), callbacks=callbacks)
        if name == "forgotten":
            with pytest.warns(UserWarning, match="without LoftCallback"):
                trainer.train()
        else:
            trainer.train()
        runs[name] = (_train_logs(trainer), _factors(model))
    (logs, factors), (guarded_logs, guarded_factors) = runs["callback"], runs["forgotten"]
    assert min(h["grad_norm"] for h in logs) > MAX_NORM  # clipping was active
    assert [h["grad_norm"] for h in guarded_logs] == [h["grad_norm"] for h in logs]
    assert _moved_from(guarded_logs) == _moved_from(logs) == [(1.0, 0.0), (0.0, 1.0)] * 2
    for want, got in zip(factors, guarded_factors):
        assert torch.equal(got, want)


def _moved_from(logs):
    return [(h["loft_moved_B"], h["loft_moved_A"]) for h in logs]


def test_trainer_with_plain_adamw_on_loft_factors_warns_at_the_start(tmp_path):
    trainer = Trainer(model=_loft_model(), args=_args(tmp_path, max_steps=1), train_dataset=_dataset())
    with pytest.warns(UserWarning, match="LoRA with alpha = r, not LoFT"):
        trainer.train()


def test_the_guard_does_nothing_when_a_loft_callback_is_present(tmp_path):
    import warnings

    trainer = _trainer(_loft_model(), _args(tmp_path, max_steps=2), callbacks=[LoftCallback()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert _moved(trainer) == [(1.0, 0.0), (0.0, 1.0)]


@pytest.mark.parametrize("device_path", [False, True])
def test_the_callback_reads_norms_and_skip_verdicts_only_when_it_logs(tmp_path, monkeypatch, device_path):
    # On a GPU, reading a value at every step makes the host wait for that step: the callback keeps the norm tensors
    # and the optimizer's verdicts, and reads them at logging time (here: 2 logs for 6 steps).
    from loft_peft.optim import device
    from loft_peft.optim.base import StepVerdict

    monkeypatch.setattr(device, "_DEVICE_PATH_ON_CPU", device_path)
    reads = []
    original = StepVerdict.skipped
    monkeypatch.setattr(StepVerdict, "skipped", lambda self: reads.append(1) or original(self))
    model = _loft_model()
    b_param = loft_factor_pairs(model)[0][0]
    trainer = _trainer(model, _args(tmp_path, max_steps=6, logging_steps=3),
                       callbacks=[LoftCallback(), PoisonStep(b_param, step=1)])
    with pytest.warns(RuntimeWarning, match="this step was skipped"):
        trainer.train()
    assert len(reads) == 6  # each verdict once, when its interval is logged
    assert _moved(trainer) == [(1 / 3, 1 / 3), (2 / 3, 1 / 3)]  # B, skipped (nothing moved), A | B, A, B
