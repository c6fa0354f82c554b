"""LoFT-Muon against independent references: dense Newton-Schulz, Muon's definition in the full space, torch AdamW."""

import io
import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from loft_peft import LoftConfig, create_loft_optimizer, loft_param_groups
from loft_peft.optim import maths
from loft_peft.optim.muon import LoftMuon, update_scale

from .conftest import tiny_llama

# Shapes (k, l, r) of (momentum, other factor): the full-space matrix is (k, l); m < n, m > n, square, r = 1, r > l.
SHAPES = [(24, 40, 4), (40, 24, 4), (16, 16, 16), (30, 7, 1), (9, 5, 6)]
# Relative Frobenius error against dense Newton-Schulz in float64. The orthonormal-core form is as accurate as dense
# Newton-Schulz itself (fp32: at most 3e-6 seen on these shapes, about 25 unit roundoffs). The Gram-matrix form works
# with squared condition numbers (up to about 35^2 for these random factors): up to 5e-5 seen in fp32.
PROJECTED_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}
GRAM_FORM_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def _conditioned(rows: int, rank: int, condition: float, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """A (rows, rank) matrix with singular values spaced log-uniformly from 1 down to 1 / condition."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, rank, dtype=torch.float64, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(rank, rank, dtype=torch.float64, generator=generator))
    values = torch.logspace(0.0, -math.log10(condition), rank, dtype=torch.float64)
    return ((left * values) @ right.T).to(dtype)


# ------------------------------------------------------------------------------------------- low-rank Newton-Schulz
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_lowrank_newton_schulz_equals_dense_newton_schulz(shape, dtype):
    k, l, r = shape
    torch.manual_seed(0)
    left, right = torch.randn(k, r, dtype=dtype), torch.randn(l, r, dtype=dtype)
    expected = maths.newton_schulz(left.double() @ right.double().T)
    ortho, core, _ = maths.newton_schulz_lowrank(left, right)
    assert core.shape == (r, r) and ortho.shape == (k, r)
    assert _relative(ortho.double() @ right.double().T, expected) < GRAM_FORM_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_projected_muon_direction_equals_dense_newton_schulz(shape, dtype):
    """``D y^T == NewtonSchulz5(m y^T)``: the factor step reproduces the dense Muon step of the full momentum."""
    k, l, r = shape
    torch.manual_seed(1)
    momentum, y = torch.randn(k, r, dtype=dtype), torch.randn(l, r, dtype=dtype)
    expected = maths.newton_schulz(momentum.double() @ y.double().T)
    direction = maths.projected_muon_direction(momentum, y)
    assert direction.shape == (k, r) and direction.dtype == dtype
    assert _relative(direction.double() @ y.double().T, expected) < PROJECTED_TOLERANCE[dtype]


@pytest.mark.parametrize("condition", [1e2, 1e3, 3e3])
def test_projected_muon_direction_is_accurate_in_fp32_for_an_ill_conditioned_factor(condition):
    """The momentum of scaled gradients is as ill-conditioned as the factor squared; fp32 must still orthogonalise.

    Multiplying the raw Gram matrices (Algorithm 4 as printed) returns singular values of about 1e8 here from
    condition 1e3 on; the balanced form stays within the fp32 error that the scaled gradient itself carries.
    """
    k, l, r = 64, 96, 8
    y = _conditioned(l, r, condition, torch.float32)
    grad_w = torch.randn(k, l, generator=torch.Generator().manual_seed(2))
    momentum = maths.scaled_gradient(grad_w @ y, maths.gram_pinv(y))  # g_W P_y, stored against y
    expected = maths.newton_schulz(momentum.double() @ y.double().T)
    direction = maths.projected_muon_direction(momentum, y)
    full = direction.double() @ y.double().T
    assert _relative(full, expected) < 5e-2
    assert float(torch.linalg.matrix_norm(full, ord=2)) < 1.25


def test_projected_muon_direction_of_zero_momentum_is_zero():
    y = torch.randn(10, 3)
    direction = maths.projected_muon_direction(torch.zeros(7, 3), y)
    assert torch.equal(direction, torch.zeros(7, 3))


def test_projected_muon_direction_takes_no_step_along_a_null_direction_of_the_other_factor():
    torch.manual_seed(3)
    y = torch.randn(12, 3, dtype=torch.float64)
    y = torch.cat([y, y[:, :1]], dim=1)  # rank 3 of 4: the direction e_0 - e_3 is null
    momentum = maths.scaled_gradient(torch.randn(8, 12, dtype=torch.float64) @ y, maths.gram_pinv(y))
    direction = maths.projected_muon_direction(momentum, y)
    null = torch.tensor([1.0, 0.0, 0.0, -1.0], dtype=torch.float64) / math.sqrt(2.0)
    assert float((direction @ null).abs().max()) < 1e-10
    expected = maths.newton_schulz(momentum @ y.T)
    assert _relative(direction @ y.T, expected) < 1e-10


# ------------------------------------------------------------------------------------------ the optimizer vs Muon
class MuonDefinitionOracle:
    """LoFT-Muon written from Algorithm 2 and eq. (8) in the full space: no calibration matrices, dense Newton-Schulz.

    It keeps every past full gradient and factor. The U-branch momentum is ``sum_i mu^(k-i) g_i P_{V_i} ... P_{V_k}``
    (each gradient projected onto every row space V has had since), the V-branch mirrored from the left with U. The
    moving factor then takes the dense Muon step of that matrix, mapped to the factor by least squares:
    ``U <- (1 - lr wd) U - lr s NewtonSchulz5(m~) (V^T)^+``.
    """

    def __init__(self, u, v, *, lr, momentum, nesterov, scale, weight_decay, alternate=True):
        self.u, self.v = u.clone(), v.clone()
        self.lr, self.mu, self.nesterov, self.weight_decay = lr, momentum, nesterov, weight_decay
        self.scale = update_scale(u.shape[0], v.shape[0], u.shape[1], scale)
        self.alternate = alternate
        self.grads, self.us, self.vs = [], [], []
        self.move_u = True

    @staticmethod
    def _projector(factor):
        return factor @ torch.linalg.pinv(factor)

    def _momentum(self, branch):
        total = torch.zeros_like(self.grads[0])
        k = len(self.grads)
        for i, grad in enumerate(self.grads):
            projected = grad
            for u, v in zip(self.us[i:], self.vs[i:]):
                projected = projected @ self._projector(v) if branch == "u" else self._projector(u) @ projected
            total += self.mu ** (k - 1 - i) * projected
        if self.nesterov:
            grad = self.grads[-1]
            current = grad @ self._projector(self.v) if branch == "u" else self._projector(self.u) @ grad
            total = current + self.mu * total
        return total

    def step(self, grad):
        self.grads.append(grad.clone())
        self.us.append(self.u.clone())
        self.vs.append(self.v.clone())
        decay, step = 1 - self.lr * self.weight_decay, self.lr * self.scale
        move_u, move_v = (self.move_u, not self.move_u) if self.alternate else (True, True)
        new_u, new_v = self.u, self.v
        if move_u:
            new_u = decay * self.u - step * maths.newton_schulz(self._momentum("u")) @ torch.linalg.pinv(self.v.T)
        if move_v:
            new_v = decay * self.v - step * maths.newton_schulz(self._momentum("v")).T @ torch.linalg.pinv(self.u.T)
        self.u, self.v = new_u, new_v
        self.move_u = not self.move_u


def _single_layer(out_features, in_features, rank, *, seed=0, dtype=torch.float64, init_weights=False):
    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(in_features, out_features, bias=False))
    model = get_peft_model(base.to(dtype), LoftConfig(r=rank, target_modules=["proj"], init_weights=init_weights))
    model.to(dtype)
    return model, model.base_model.model.proj


def _loss(weight, inputs, targets):
    """A smooth, non-quadratic loss of a linear layer, so the momentum changes direction from step to step."""
    return (nn.functional.softplus(inputs @ weight.T) * targets).sum() / inputs.shape[0] + 0.1 * weight.pow(4).sum()


@pytest.mark.parametrize(
    "out_features, in_features, options",
    [
        (12, 9, dict(scale="none")),
        (9, 14, dict(scale="rms", weight_decay=0.05)),
        (14, 9, dict(scale="spectral", nesterov=True)),
        (10, 10, dict(scale="rms", nesterov=True, alternate=False)),
    ],
)
def test_loft_muon_equals_definition_oracle(out_features, in_features, options):
    options = dict(dict(lr=2e-2, momentum=0.9, nesterov=False, weight_decay=0.0), **options)
    model, layer = _single_layer(out_features, in_features, 3)
    b_param, a_param = layer.loft_B["default"], layer.loft_A["default"]
    w0 = layer.base_layer.weight.detach()
    torch.manual_seed(1)
    inputs = torch.randn(20, in_features, dtype=torch.float64)
    targets = torch.rand(20, out_features, dtype=torch.float64)
    alternate = options.pop("alternate", True)
    optimizer = create_loft_optimizer(model, optimizer="muon", alternate=alternate, **options)
    oracle = MuonDefinitionOracle(b_param.detach(), a_param.detach().T, alternate=alternate, **options)
    worst = 0.0
    for _ in range(12):
        _loss(w0 + b_param @ a_param, inputs, targets).backward()
        weight = (w0 + oracle.u @ oracle.v.T).requires_grad_(True)
        (grad,) = torch.autograd.grad(_loss(weight, inputs, targets), weight)
        oracle.step(grad)
        optimizer.step()
        optimizer.zero_grad()
        worst = max(worst, _relative(b_param.detach(), oracle.u), _relative(a_param.detach().T, oracle.v))
    assert worst < 1e-9, f"LoFT-Muon departs from the full-space definition by {worst:.2e} (relative)"
    assert _relative(oracle.u, oracle.us[0]) > 0.05 and _relative(oracle.v, oracle.vs[0]) > 0.05


@pytest.mark.parametrize("scale", ["none", "rms"])
def test_full_space_step_has_rank_r_and_a_flat_spectrum(scale):
    """One step changes W by -lr * scale times a rank-r matrix with singular values in about [0.7, 1.2].

    The gradient's own top singular values are spread over a factor of 30: the step flattens them.
    """
    out_features, in_features, rank, lr = 40, 24, 4, 1e-2
    model, layer = _single_layer(out_features, in_features, rank, seed=5)
    b_param, a_param = layer.loft_B["default"], layer.loft_A["default"]
    optimizer = create_loft_optimizer(model, optimizer="muon", lr=lr, scale=scale)
    target = _conditioned(out_features, in_features, 30.0, seed=6) * 10.0
    spectra = []
    for _ in range(4):  # B, A, B, A: both factors' steps
        before = (b_param @ a_param).detach().clone()
        (0.5 * (b_param @ a_param - target).pow(2).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        spectra.append(torch.linalg.svdvals((b_param @ a_param).detach() - before))
    step = lr * update_scale(out_features, in_features, rank, scale)
    for values in spectra:
        assert float(values[rank:].max()) < 1e-10 * step, "the step has rank above r"
        top = values[:rank] / step
        assert 0.6 < float(top.min()) and float(top.max()) < 1.25, f"not flat: {top.tolist()}"


@pytest.mark.parametrize("rank", [2, 6, 24])  # low rank, and full rank (r = min(out, in) = 24)
def test_rms_scale_gives_the_step_adamws_rms_and_is_moonlights_at_full_rank(rank):
    out_features, in_features, lr = 40, 24, 1e-2
    model, layer = _single_layer(out_features, in_features, rank, seed=11)
    b_param, a_param = layer.loft_B["default"], layer.loft_A["default"]
    optimizer = create_loft_optimizer(model, optimizer="muon", lr=lr, scale="rms")
    before = (b_param @ a_param).detach().clone()
    model(torch.randn(64, in_features, dtype=torch.float64)).pow(2).sum().backward()
    optimizer.step()
    rms = float(((b_param @ a_param).detach() - before).pow(2).mean().sqrt())
    assert 0.2 * 0.7 < rms / lr < 0.2 * 1.2, "Newton-Schulz leaves singular values in about [0.7, 1.2]"
    if rank == min(out_features, in_features):
        assert update_scale(out_features, in_features, rank, "rms") == pytest.approx(0.2 * math.sqrt(out_features))


def test_state_per_layer_is_two_momenta_and_an_r_by_r_matrix():
    """O((m + n) r) state: LoRA's with momentum ((m + n) r numbers) plus at most r^2 + 2 scalars, never m x n."""
    out_features, in_features, rank = 40, 24, 4
    model, layer = _single_layer(out_features, in_features, rank, dtype=torch.float32)
    optimizer = create_loft_optimizer(model, optimizer="muon", lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, in_features)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    numel = sum(
        value.numel()
        for param in (layer.loft_B["default"], layer.loft_A["default"])
        for value in optimizer.state[param].values()
    )
    assert (out_features + in_features) * rank <= numel <= (out_features + in_features) * rank + rank * rank + 2


# ---------------------------------------------------------------------------------- checkpoints, clipping, AdamW part
def _toy_loft(toy_model, dtype=torch.float32):
    model = get_peft_model(toy_model, LoftConfig(r=3, target_modules=["proj"], modules_to_save=["head"]))
    return model.to(dtype)


def _train(model, optimizer, batches, *, clip=None):
    for x in batches:
        model(x).pow(2).mean().backward()
        if clip is not None:
            optimizer.clip_grad_norm_(clip)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stop", [3, 4])  # after a B step (a calibration pending for the momentum of A) and an A step
def test_resume_equals_uninterrupted_run(dtype, stop):
    from .conftest import ToyModel

    torch.manual_seed(7)
    batches = [torch.randn(6, 9).to(dtype) for _ in range(8)]
    options = dict(optimizer="muon", lr=1e-2, adamw_lr=1e-3, weight_decay=0.01, nesterov=True)

    torch.manual_seed(0)
    reference = _toy_loft(ToyModel(), dtype)
    reference_opt = create_loft_optimizer(reference, **options)
    _train(reference, reference_opt, batches, clip=1.0)

    torch.manual_seed(0)
    first = _toy_loft(ToyModel(), dtype)
    first_opt = create_loft_optimizer(first, **options)
    _train(first, first_opt, batches[:stop], clip=1.0)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    torch.manual_seed(1)  # a different initialisation, overwritten by the checkpoint
    resumed = _toy_loft(ToyModel(), dtype)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = create_loft_optimizer(resumed, **options)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert all(
        value.dtype in (torch.float32, torch.int64)
        for state in resumed_opt.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    ), "state must stay fp32 whatever the factors' dtype"
    _train(resumed, resumed_opt, batches[stop:], clip=1.0)

    for (name, expected), actual in zip(reference.named_parameters(), resumed.parameters()):
        assert torch.equal(actual, expected), f"{name} differs after resuming"


def test_clip_grad_norm_bounds_the_effective_gradient(toy_model):
    model = _toy_loft(toy_model)
    optimizer = create_loft_optimizer(model, optimizer="muon", lr=1e-2)
    for step in range(4):  # both phases, B and A
        (100.0 * model(torch.randn(6, 9)).pow(2).mean()).backward()
        before = optimizer.effective_grad_norm()
        returned = optimizer.clip_grad_norm_(0.5)
        assert torch.equal(returned, before)
        assert float(before) > 0.5, "the gradient must be large enough for clipping to act"
        assert float(optimizer.effective_grad_norm()) <= 0.5 * (1 + 1e-5)
        optimizer.step()
        optimizer.zero_grad()


def test_plain_parameters_get_adamw_with_the_adamw_settings(toy_model):
    model = get_peft_model(toy_model.double(), LoftConfig(r=2, target_modules=["proj"], modules_to_save=["head"]))
    head = model.base_model.model.head.modules_to_save["default"]
    twin = nn.Linear(12, 5).double()
    twin.load_state_dict(head.state_dict())
    reference = torch.optim.AdamW(twin.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    optimizer = create_loft_optimizer(
        model, optimizer="muon", lr=0.05, adamw_lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1
    )
    torch.manual_seed(0)
    x = torch.randn(8, 9, dtype=torch.float64)
    for _ in range(10):
        hidden = model.base_model.model.act(model.base_model.model.proj(x)).detach()
        (head(hidden) ** 2).sum().backward()
        (twin(hidden) ** 2).sum().backward()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()
    torch.testing.assert_close(head.weight, twin.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.bias, twin.bias, rtol=1e-12, atol=1e-12)


def test_a_scheduler_scales_the_muon_and_the_adamw_rates(toy_model):
    model = _toy_loft(toy_model)
    optimizer = create_loft_optimizer(model, optimizer="muon", lr=0.02, adamw_lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    optimizer.step()
    scheduler.step()
    factor_group, plain_group = optimizer.param_groups
    assert factor_group["loft"] and not plain_group["loft"]
    assert factor_group["lr"] == pytest.approx(0.01) and plain_group["lr"] == pytest.approx(5e-4)


def test_adamw_lr_defaults_to_lr(toy_model):
    optimizer = create_loft_optimizer(_toy_loft(toy_model), optimizer="muon", lr=3e-4)
    assert [group["lr"] for group in optimizer.param_groups] == [3e-4, 3e-4]


def test_factory_passes_the_muon_options(toy_model):
    optimizer = create_loft_optimizer(
        _toy_loft(toy_model), optimizer="muon", lr=0.02, momentum=0.9, nesterov=True, ns_steps=3, scale="spectral"
    )
    assert isinstance(optimizer, LoftMuon)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["ns_steps"], group["scale"]) == (0.9, True, 3, "spectral")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(ns_steps=2.5), "ns_steps"),
        (dict(scale="moonlight"), "scale"),
        (dict(adamw_lr=-1.0), "adamw_lr"),
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(0.9, 1.0)), "betas"),
    ],
)
def test_bad_options_raise_value_error(toy_model, options, message):
    options = dict(dict(lr=0.02), **options)
    with pytest.raises(ValueError, match=message):
        create_loft_optimizer(_toy_loft(toy_model), optimizer="muon", **options)


def test_update_scale_rejects_an_unknown_scale():
    with pytest.raises(ValueError, match="scale"):
        update_scale(4, 4, 2, "max")


@pytest.mark.parametrize(
    "optimizer, option", [("muon", "beta"), ("muon", "compile"), ("adamw", "momentum"), ("adamw", "ns_steps")]
)
def test_an_option_the_chosen_optimizer_lacks_raises_type_error_naming_it(toy_model, optimizer, option):
    with pytest.raises(TypeError, match=f"Unexpected options for optimizer='{optimizer}': \\['{option}'\\]"):
        create_loft_optimizer(_toy_loft(toy_model), optimizer=optimizer, lr=0.02, **{option: 1})


def test_factory_passes_the_adamw_path_options(toy_model):
    optimizer = create_loft_optimizer(_toy_loft(toy_model), lr=0.02, foreach=False, compile=True)
    assert (optimizer.param_groups[0]["foreach"], optimizer.param_groups[0]["compile"]) == (False, True)


# ---------------------------------------------------------------------------------------------------------- training
def _token_batches(vocab_size, count, *, seed=0, batch=4, length=16):
    """Sequences counting up modulo the vocabulary from random starts: learnable, but not by the untrained model."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab_size, (count, batch, 1), generator=generator)
    return list((starts + torch.arange(length)) % vocab_size)


def test_training_a_tiny_llama_lowers_the_loss():
    model = get_peft_model(tiny_llama(), LoftConfig(r=4))
    optimizer = create_loft_optimizer(model, optimizer="muon", lr=0.1, scale="none")
    batches = _token_batches(model.config.vocab_size, 2)
    losses = []
    for step in range(40):
        ids = batches[step % 2]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    print(f"tiny llama: loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.2, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("condition", [1e3, 1e4])  # inside and beyond fp32's pseudo-inverse cut-off for r = 6
@pytest.mark.parametrize("scale", ["none", "rms"])
def test_training_stays_stable_when_a_factor_is_nearly_rank_deficient(scale, condition):
    """loft_A's rows are nearly dependent, so scaled gradients and momenta grow like condition^2 along one direction.

    Every step must still change W by at most 1.25 lr * scale in spectral norm (the Newton-Schulz bound), stay finite,
    and the loss must fall steadily.
    """
    out_features, in_features, rank, lr = 48, 32, 6, 2e-3
    model, layer = _single_layer(out_features, in_features, rank, seed=8, dtype=torch.float32, init_weights=True)
    b_param, a_param = layer.loft_B["default"], layer.loft_A["default"]
    with torch.no_grad():
        a_param.copy_(_conditioned(in_features, rank, condition, torch.float32, seed=9).T)
    w0 = layer.base_layer.weight.detach()
    target = w0 + _conditioned(out_features, in_features, 10.0, torch.float32, seed=10)
    optimizer = create_loft_optimizer(model, optimizer="muon", lr=lr, scale=scale)
    bound = 1.25 * lr * update_scale(out_features, in_features, rank, scale)
    losses = []
    for _ in range(30):
        before = (b_param @ a_param).detach().clone()
        loss = 0.5 * (w0 + b_param @ a_param - target).pow(2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        change = (b_param @ a_param).detach() - before
        assert torch.isfinite(change).all()
        assert float(torch.linalg.matrix_norm(change, ord=2)) <= bound
    assert all(later < earlier for earlier, later in zip(losses[::5], losses[5::5])), losses


def test_loft_trainer_trains_with_loft_muon(tmp_path):
    """The Trainer integration needs nothing Muon-specific: LoftTrainer builds LoftMuon, clips and logs alternation."""
    from transformers import TrainingArguments

    from loft_peft.trainer import MOVED_A, MOVED_B, LoftTrainer, unwrap_loft_optimizer

    class Sequences(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, index):
            return {"input_ids": self.rows[index], "labels": self.rows[index]}

    model = get_peft_model(tiny_llama(), LoftConfig(r=4))
    rows = [row for batch in _token_batches(model.config.vocab_size, 2) for row in batch]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=1.0,
    )
    muon = {"optimizer": "muon", "scale": "none"}
    trainer = LoftTrainer(model=model, args=args, train_dataset=Sequences(rows), loft_optimizer_kwargs=muon)
    trainer.train()
    assert isinstance(unwrap_loft_optimizer(trainer.optimizer), LoftMuon)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry[MOVED_B] for entry in logs] == [1.0, 0.0] * 4 and [entry[MOVED_A] for entry in logs] == [0.0, 1.0] * 4
    assert (logs[-1]["loss"] + logs[-2]["loss"]) / 2 < (logs[0]["loss"] + logs[1]["loss"]) / 2 - 0.05


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(nesterov=True, weight_decay=0.1), dict(alternate=False),
                                     dict(calibrate=False)], ids=str)
def test_batched_loft_muon_equals_the_per_pair_reference(device_path, options, monkeypatch):
    from peft import get_peft_model

    from loft_peft import LoftConfig
    from loft_peft.optim import device

    from .conftest import tiny_llama

    from .reference import ReferenceLoftMuon

    results = []
    for batched in (True, False):
        monkeypatch.setattr(device, "_DEVICE_PATH_ON_CPU", device_path and batched)  # the reference runs on the host
        model = get_peft_model(tiny_llama(0), LoftConfig(r=3, init_weights=False))
        if batched:
            optimizer = create_loft_optimizer(model, optimizer="muon", lr=2e-2, **options)
        else:
            optimizer = ReferenceLoftMuon(loft_param_groups(model), lr=2e-2, **options)
        for step in range(6):
            ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad()
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in results[1].items():
        torch.testing.assert_close(results[0][name], value, rtol=2e-4, atol=2e-6, msg=name)


def test_batched_loft_muon_skips_a_nan_step_on_the_device_and_the_run_goes_on_as_without_it(monkeypatch):
    from peft import get_peft_model

    from loft_peft import LoftConfig
    from loft_peft.optim import device

    from .conftest import tiny_llama

    monkeypatch.setattr(device, "_DEVICE_PATH_ON_CPU", True)
    runs = []
    for poison in (False, True):
        model = get_peft_model(tiny_llama(0), LoftConfig(r=3, init_weights=False))
        optimizer = create_loft_optimizer(model, optimizer="muon", lr=2e-2)
        for step in ([0, 1, 2, 3] if poison else [0, 1, 3]):
            ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            if poison and step == 2:
                next(p for n, p in model.named_parameters() if "loft_A" in n).grad[0, 0] = float("nan")
                with pytest.warns(RuntimeWarning, match="skipped"):
                    optimizer.step()
                    assert optimizer.last_step_was_skipped()
            else:
                optimizer.step()
            optimizer.zero_grad()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in runs[0].items():
        assert torch.equal(runs[1][name], value), name
