"""Training a LoFT adapter with the ``transformers`` ``Trainer``: the callback, and an optional ``LoftTrainer``.

The documented way::

    trainer = Trainer(
        model=peft_model,
        args=TrainingArguments(..., max_grad_norm=1.0),
        train_dataset=train_ds,
        optimizers=(create_loft_optimizer(peft_model, lr=2e-4), None),
        callbacks=[LoftCallback()],
    )

or, with the optimizer built inside the Trainer, ``optimizer_cls_and_kwargs=(LoftOptimizerFactory, {"lr": 2e-4})``
in place of ``optimizers``. :class:`LoftTrainer` does both for you and also puts the LoFT fields in front of every
reporting integration.

What :class:`LoftCallback` changes in the Trainer's loop (transformers 5, read from ``Trainer._run_epoch``):

* **Clipping.** ``max_grad_norm = X`` means the paper's effective-gradient clipping (block 6), once per optimizer step,
  on the accumulated gradient. The Trainer clips right after the last micro-batch's backward, before any callback
  runs, so the callback sets ``args.max_grad_norm`` to 0 from the start of each optimizer step until
  ``on_pre_optimizer_step`` (where it puts ``X`` back): the Trainer then only measures the plain norm, through
  ``accelerator.clip_grad_norm_(..., inf)``, which also unscales fp16 gradients, so the callback's clip in
  ``on_pre_optimizer_step`` sees unscaled gradients. Outside that window (evaluation, checkpoints) ``args`` hold ``X``.
* **Mixed precision.** With a GradScaler, an overflowing step is skipped by the scaler without calling the
  optimizer's ``step()``; the alternation toggles and the state advances only inside ``step()``, so nothing moves.
* **Logs.** Every training log's ``grad_norm`` is the effective norm (before clipping) of the last optimizer step, and
  ``loft_moved_B`` / ``loft_moved_A`` give the share of optimizer steps since the previous log in which B / A moved
  (with ``logging_steps=1``: 1 or 0, so TensorBoard draws the alternation as two interleaved square waves; a skipped
  fp16 step counts for neither). A callback can only edit a log after the callbacks before it have seen it, and the
  Trainer puts the reporting integrations of ``report_to`` before the user's callbacks: with a plain ``Trainer`` the
  fields reach ``state.log_history`` and the callbacks after ``LoftCallback``, while TensorBoard and the like see them
  with :class:`LoftTrainer`, which writes them into the log before any callback runs.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import transformers.trainer
from transformers import Trainer, TrainerCallback

from .distributed import keep_trainable_parameters_replicated, prepare_distributed_training
from .optim import create_loft_optimizer
from .optim.base import LoftOptimizerBase
from .optim.guard import warn_if_not_loft

# Keys added to the training logs.
MOVED_B = "loft_moved_B"
MOVED_A = "loft_moved_A"


def unwrap_loft_optimizer(optimizer: Any) -> LoftOptimizerBase:
    """The LoFT optimizer inside ``optimizer`` (which may be accelerate's ``AcceleratedOptimizer`` around it).

    Raises:
        TypeError: no LoFT optimizer is found (a LoFT optimizer always holds a factor pair: it refuses to be built
            without one).
    """
    inner = _inner_loft_optimizer(optimizer)
    if inner is None:
        innermost = optimizer
        while hasattr(innermost, "optimizer"):
            innermost = innermost.optimizer
        raise TypeError(
            f"LoftCallback needs a LoFT optimizer, but the Trainer's optimizer is {type(innermost).__name__}: pass "
            "`optimizers=(create_loft_optimizer(model, lr=...), None)` or "
            "`optimizer_cls_and_kwargs=(LoftOptimizerFactory, {'lr': ...})` to the Trainer, or use LoftTrainer."
        )
    return inner


def _inner_loft_optimizer(optimizer: Any) -> LoftOptimizerBase | None:
    """The LoFT optimizer inside accelerate's wrappers, or ``None``."""
    inner = optimizer
    while not isinstance(inner, LoftOptimizerBase) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner if isinstance(inner, LoftOptimizerBase) else None


class LoftOptimizerFactory:
    """For ``Trainer(optimizer_cls_and_kwargs=(LoftOptimizerFactory, {"lr": ...}))``.

    The Trainer (transformers >= 5) instantiates a non-``Optimizer`` class and calls it with the model and the kwargs;
    this passes them to :func:`~loft_peft.create_loft_optimizer`, which finds the factor pairs through the LoFT layers
    and takes every option it has (``optimizer="muon"``, ``variant``, ...). ``LoftAdamW`` itself works too: it finds
    the pairs in the Trainer's name-based parameter groups through the factors' marks.
    """

    def __call__(self, model: torch.nn.Module, **kwargs: Any) -> LoftOptimizerBase:
        return create_loft_optimizer(model, **kwargs)


class LoftCallback(TrainerCallback):
    """Makes the ``Trainer`` clip and log a LoFT optimizer the way the paper defines it.

    See the module docstring for what changes. At the start of training it raises ``TypeError`` if the Trainer's
    optimizer is not a LoFT optimizer built from the model, and runs
    :func:`loft_peft.distributed.prepare_distributed_training` (``ValueError`` under DeepSpeed or FSDP1; gradient
    averaging for the replicated factors under FSDP2).
    """

    def __init__(self) -> None:
        self._max_grad_norm: float = 0.0
        self._suspended = False
        self._pending: tuple[str | None, Any] | None = None
        self._reset_interval()

    def _reset_interval(self) -> None:
        # Per optimizer step since the last log: (factor that moved, effective norm, skipped by a GradScaler, the
        # optimizer's verdict). Norms and verdicts are read at logging time only: on a GPU, reading them at every
        # step would make the host wait for each step to finish.
        self._records: list[tuple[str | None, Any, bool, Any]] = []
        self._folded = (0, 0, 0)  # (steps, B moved, A moved) of records already read (long logging intervals)

    def _fold(self, records: list) -> tuple[int, int, int]:
        steps, moved_b, moved_a = self._folded
        for moving, _, scaler_skipped, verdict in records:
            steps += 1
            if not scaler_skipped and not (verdict is not None and verdict.skipped()):
                moved_b += moving in ("B", "both")
                moved_a += moving in ("A", "both")
        return steps, moved_b, moved_a

    # ---------------------------------------------------------------------------------------- taking over clipping
    def _suspend_trainer_clip(self, args) -> None:
        if not self._suspended:
            self._max_grad_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
            self._suspended = True

    def _restore_trainer_clip(self, args) -> None:
        if self._suspended:
            args.max_grad_norm = self._max_grad_norm
            self._suspended = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # A previous train() that died inside a step left the Trainer's clip suspended: give args their value back.
        self._restore_trainer_clip(args)
        # Refuse engines that flatten or shard the factor pairs; under FSDP2, average the replicated factors' grads.
        loft = unwrap_loft_optimizer(optimizer)
        _claimed.add(loft)
        prepare_distributed_training(model, loft)
        self._pending = None
        self._reset_interval()

    def on_step_begin(self, args, state, control, **kwargs):
        self._suspend_trainer_clip(args)

    def on_substep_end(self, args, state, control, **kwargs):
        # Covers an optimizer step whose first micro-batch did not start with on_step_begin (a resume whose
        # accumulation does not line up), so the Trainer never clips the plain gradient.
        self._suspend_trainer_clip(args)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._restore_trainer_clip(args)
        loft = unwrap_loft_optimizer(optimizer)
        moving = loft.moving_factor()
        norm = loft.clip_grad_norm_(args.max_grad_norm)
        self._pending = (moving, norm)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._pending is None:
            return
        moving, norm = self._pending
        self._pending = None
        # accelerate's wrapper knows whether its GradScaler skipped the step (fp16 overflow), and the LoFT optimizer
        # whether it skipped a step on a NaN or inf gradient itself (bf16, fp32); then nothing moved.
        scaler_skipped = bool(getattr(optimizer, "step_was_skipped", False))
        self._records.append((moving, norm, scaler_skipped, unwrap_loft_optimizer(optimizer).last_step_verdict()))
        if len(self._records) > 64:  # read the oldest (finished long ago), keep the last norm
            self._folded = self._fold(self._records[:-1])
            self._records = self._records[-1:]

    def on_train_end(self, args, state, control, **kwargs):
        self._restore_trainer_clip(args)

    # ---------------------------------------------------------------------------------------------------- logging
    def log_fields(self) -> dict[str, float]:
        """The fields for the next training log (effective ``grad_norm``, ``loft_moved_B/A``); starts a new interval.

        Empty when no optimizer step ran since the previous log.
        """
        if not self._records:
            return {}
        steps, moved_b, moved_a = self._fold(self._records)
        fields = {"grad_norm": float(self._records[-1][1]), MOVED_B: moved_b / steps, MOVED_A: moved_a / steps}
        self._reset_interval()
        return fields

    def on_log(self, args, state, control, logs=None, **kwargs):
        # A training log (not an evaluation or the final summary) carries the Trainer's plain grad_norm. LoftTrainer
        # has already put the fields in (so reporting integrations saw them); with a plain Trainer they go in here,
        # for the callbacks after this one and for state.log_history.
        if logs is None or "grad_norm" not in logs or MOVED_B in logs:
            return
        fields = self.log_fields()
        logs.update(fields)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            entry = state.log_history[-1]
            if "grad_norm" in entry and MOVED_B not in entry:
                entry.update(fields)


class LoftTrainerMixin:
    """Makes any ``Trainer`` subclass a LoFT trainer: ``class MyTrainer(LoftTrainerMixin, SomeTrainer)``.

    Compared with ``SomeTrainer(..., optimizers=(create_loft_optimizer(model, lr=...), None),
    callbacks=[LoftCallback()])`` it

    * builds the optimizer inside the Trainer (after device placement, and after trainers such as TRL's have wrapped
      the model with ``peft_config``), from ``args.learning_rate``, ``args.adam_beta1/adam_beta2``,
      ``args.adam_epsilon`` and ``args.weight_decay``, plus ``loft_optimizer_kwargs`` (e.g. ``{"optimizer": "muon"}``
      or ``{"variant": "simple"}``), instead of falling back to plain AdamW;
    * adds a :class:`LoftCallback` unless one is given;
    * under accelerate's FSDP2, keeps the LoFT factors out of the sharding when the config did not choose
      (:func:`loft_peft.distributed.keep_trainable_parameters_replicated`);
    * writes the LoFT fields into each training log before any callback sees it, so reporting integrations
      (TensorBoard, W&B, ...) that ``report_to`` places before user callbacks log the effective ``grad_norm`` and
      ``loft_moved_B`` / ``loft_moved_A`` too.

    :class:`LoftTrainer` is this mixin on ``Trainer``; :mod:`loft_peft.trl` puts it on TRL's trainers.

    Args:
        *args, **kwargs: as for the Trainer it is mixed into.
        loft_optimizer_kwargs: extra keyword arguments for :func:`~loft_peft.create_loft_optimizer`.
    """

    def __init__(self, *args: Any, loft_optimizer_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(cb, LoftCallback) or cb is LoftCallback for cb in callbacks):
            callbacks.append(LoftCallback())
        self.loft_optimizer_kwargs = dict(loft_optimizer_kwargs or {})
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self._loft_callback = next(
            cb
            for cb in self.callback_handler.callbacks
            if isinstance(cb, LoftCallback) and not isinstance(cb, LoftGuardCallback)
        )
        # Under FSDP2 the factors must stay out of the sharding; the model is prepared (sharded) in train().
        keep_trainable_parameters_replicated()

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            options = {
                "lr": self.args.learning_rate,
                "betas": (self.args.adam_beta1, self.args.adam_beta2),
                "eps": self.args.adam_epsilon,
                "weight_decay": self.args.weight_decay,
                **self.loft_optimizer_kwargs,
            }
            self.optimizer = create_loft_optimizer(self.model if model is None else model, **options)
            return self.optimizer
        return super().create_optimizer(model)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "grad_norm" in logs:
            logs.update(self._loft_callback.log_fields())
        super().log(logs, *args, **kwargs)


class LoftTrainer(LoftTrainerMixin, Trainer):
    """A ``Trainer`` that builds the LoFT optimizer from its arguments and reports LoFT's fields everywhere.

    See :class:`LoftTrainerMixin`, which this is on ``Trainer``.
    """


# ------------------------------------------------------------------------------------------- the Trainer's guard
_claimed: "weakref.WeakSet[LoftOptimizerBase]" = weakref.WeakSet()  # LoFT optimizers a LoftCallback is driving


class LoftGuardCallback(LoftCallback):
    """In every ``Trainer`` (``import loft_peft`` adds it to transformers' default callbacks): no silent LoRA.

    * A Trainer whose optimizer is not LoFT's, on a model with LoFT factors, gets a warning at the start of training
      (:func:`loft_peft.optim.guard.warn_if_not_loft`).
    * A Trainer stepping a LoFT optimizer with no :class:`LoftCallback` would clip the plain gradient norm instead of
      the effective one and log the wrong ``grad_norm``. The guard then warns once and does the callback's work itself.
      It decides at the first step, once every callback's ``on_train_begin`` has run (a ``LoftCallback`` claims its
      optimizer there), and does nothing when a ``LoftCallback`` is present.
    """

    def __init__(self) -> None:
        super().__init__()
        self._active = False
        self._undecided = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._active = False
        self._undecided = optimizer is not None
        if optimizer is not None:
            warn_if_not_loft(optimizer)

    def _decide(self, args, state, control, model, optimizer) -> None:
        self._undecided = False
        loft = _inner_loft_optimizer(optimizer)
        if loft is None or loft in _claimed:
            return
        warnings.warn(
            "The Trainer steps a LoFT optimizer without LoftCallback, so it would clip the plain gradient norm, not "
            "LoFT's effective one (block 6): loft_peft added the callback's clipping and logs to this run. Pass "
            "`callbacks=[LoftCallback()]` or use LoftTrainer to say so explicitly.",
            UserWarning,
            stacklevel=2,
        )
        self._active = True
        super().on_train_begin(args, state, control, model=model, optimizer=optimizer)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._undecided:
            self._decide(args, state, control, model, optimizer)
        if self._active:
            super().on_step_begin(args, state, control)

    def on_substep_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._undecided:
            self._decide(args, state, control, model, optimizer)
        if self._active:
            super().on_substep_end(args, state, control)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._active:
            super().on_pre_optimizer_step(args, state, control, **kwargs)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._active:
            super().on_optimizer_step(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self._active:
            super().on_train_end(args, state, control, **kwargs)
        self._active = False

    def on_log(self, args, state, control, **kwargs):
        if self._active:
            super().on_log(args, state, control, **kwargs)


def install_trainer_guard() -> None:
    """Add :class:`LoftGuardCallback` to every ``Trainer`` built from now on (once; ``import loft_peft`` does it)."""
    if LoftGuardCallback not in transformers.trainer.DEFAULT_CALLBACKS:
        transformers.trainer.DEFAULT_CALLBACKS.append(LoftGuardCallback)
