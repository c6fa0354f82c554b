"""LoFT-AdamW's batched implementation (:mod:`loft_peft.optim.kernels`) against the reference maths.

The reference is :class:`tests.reference.ReferenceLoftAdamW`, which steps each pair through the functions of
``maths``. In float64
the two agree to round-off on any data. In float32 they agree to 1e-5 where the sum that rebuilds the second moment,
``v~ = p (y * y)`` (eq. 12), does not cancel: where ``m~ = m y^T`` is near zero that sum loses about half its digits
in any implementation (``test_fp32_run_stays_close_to_float64_run`` measures it), and two implementations that add in
a different order then disagree there. The fp32 runs therefore use gradients whose full-space part is a positive
rank-one matrix lying in both factors' spans, plus noise, which keeps ``m~`` away from zero; the fp64 runs use plain
random gradients.

The fast path's large work has three backends (the ``backend`` fixture): the fused C kernels of
:mod:`loft_peft.optim.native` (the default for fp32 on CPUs; skipped where they cannot be built), batched
``torch.bmm`` GEMMs, and the device path on CPU tensors. Tests without the fixture run on the default.
"""

import contextlib
import os
import warnings

import pytest
import torch
from torch import nn

from loft_peft.optim import device, kernels, maths, native
from loft_peft.optim.adamw import LoftAdamW

from .reference import ReferenceLoftAdamW, reference_effective_grad_norm

# (out, in, r): r = 1, r > min(m, n) / 2, r = min(m, n), r > min(m, n) (a singular Gram matrix: the pseudo-inverse),
# and three layers of one shape beside layers of other shapes, so the batched buckets hold more than one pair.
SHAPES = [(64, 48, 1), (64, 48, 4), (48, 64, 8), (20, 12, 7), (12, 9, 9), (12, 9, 11), (33, 17, 16)]


# "device": the path of every device but the CPU (no host reads, updates cancelled on the device), on CPU tensors.
BACKENDS = ["native", "bmm", "device"]


@contextlib.contextmanager
def _backend(name):
    """Use the fused C kernels, torch.bmm or the device path for the large work (skipping a backend absent here)."""
    saved = native.USE_NATIVE, device._DEVICE_PATH_ON_CPU
    native.USE_NATIVE = None if name == "native" else False
    device._DEVICE_PATH_ON_CPU = name == "device"
    try:
        if name == "native" and not native.enabled():
            pytest.skip("the native kernels could not be built here (no C compiler?)")
        yield
    finally:
        native.USE_NATIVE, device._DEVICE_PATH_ON_CPU = saved


@pytest.fixture(params=BACKENDS)
def backend(request):
    with _backend(request.param):
        yield request.param


def _orthonormal_with(first: torch.Tensor, columns: int, generator: torch.Generator) -> torch.Tensor:
    """A (len(first), columns) matrix with orthonormal columns, the first along ``first``."""
    basis = torch.randn(first.shape[0], columns, generator=generator, dtype=first.dtype)
    basis[:, 0] = first
    q, r = torch.linalg.qr(basis)
    return q * torch.sign(torch.diagonal(r))


class _Problem:
    """Several LoFT factor pairs with a full-space gradient per step, and two optimizers stepping clones of them:
    ``optimizers[True]`` is LoftAdamW (same-shape layers batched), ``optimizers[False]`` the per-layer reference (or,
    with ``reference=False``, LoftAdamW with ``foreach=False``: every layer a batch of one)."""

    def __init__(self, shapes, *, dtype, structured, seed=0, scale=1.0, reference=True, **options):
        self.generator = torch.Generator().manual_seed(seed)
        self.shapes, self.dtype, self.structured = shapes, dtype, structured
        self.params = {True: [], False: []}
        self.directions = []
        for out_features, in_features, rank in shapes:
            a = torch.rand(out_features, generator=self.generator, dtype=dtype) + 1.0
            b = torch.rand(in_features, generator=self.generator, dtype=dtype) + 1.0
            if structured:  # factors whose spans hold the gradient's rank-one part (and are well conditioned)
                u = _padded(_orthonormal_with(a, min(rank, out_features), self.generator), rank, self.generator) * scale
                v = _padded(_orthonormal_with(b, min(rank, in_features), self.generator), rank, self.generator) * scale
            else:
                u = torch.randn(out_features, rank, generator=self.generator, dtype=dtype) / rank**0.5
                v = torch.randn(in_features, rank, generator=self.generator, dtype=dtype) / rank**0.5
            self.directions.append((a, b))
            for foreach in (True, False):
                self.params[foreach] += [nn.Parameter(u.clone()), nn.Parameter(v.T.contiguous().clone())]
        second = ReferenceLoftAdamW if reference else LoftAdamW
        self.optimizers = {
            True: LoftAdamW([{"params": self.params[True], "loft": True}], **options),
            False: second([{"params": self.params[False], "loft": True}], foreach=False, **options),
        }

    def gradients(self, skip=()):
        """Set both copies' factor gradients from one full-space gradient per layer (``g_U = G V``, ``g_V = U^T G``)."""
        for index, ((out_features, in_features, _), (a, b)) in enumerate(zip(self.shapes, self.directions)):
            noise = torch.randn(out_features, in_features, generator=self.generator, dtype=self.dtype)
            full = torch.outer(a, b) + 0.1 * noise if self.structured else noise
            for foreach in (True, False):
                b_param, a_param = self.params[foreach][2 * index : 2 * index + 2]
                if index in skip:
                    b_param.grad = a_param.grad = None
                else:
                    b_param.grad = full @ a_param.detach().T
                    a_param.grad = b_param.detach().T @ full

    def step(self, skip=()):
        self.gradients(skip)
        for optimizer in self.optimizers.values():
            optimizer.step()

    def worst_relative_difference(self):
        return max(
            float((fast.detach() - ref.detach()).abs().max() / ref.detach().abs().max())
            for fast, ref in zip(self.params[True], self.params[False])
        )


def _padded(x, rank, generator):
    if x.shape[1] == rank:
        return x
    extra = torch.randn(x.shape[0], rank - x.shape[1], generator=generator, dtype=x.dtype)
    return torch.cat([x, extra], dim=1)


OPTIONS = [
    dict(),
    dict(variant="simple"),
    dict(variant="simple", simple_rescale=True, lr=3e-3),
    dict(weight_decay=0.1),
    dict(alternate=False),
    dict(calibrate=False),
    dict(betas=(0.9, 0.5)),  # beta1^2 >= beta2: no second-moment floor, v~ clamped at 0
]


def _ids(options):
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


@pytest.mark.parametrize(
    "options, backend",
    [(OPTIONS[0], "bmm"), (OPTIONS[1], "bmm")]
    + [(options, backend) for options in OPTIONS for backend in ("native", "device")],
    ids=lambda x: _ids(x) if isinstance(x, dict) else x,
)
def test_fast_path_equals_reference_in_fp32_over_many_steps_and_shapes(options, backend):
    with _backend(backend):
        problem = _Problem(SHAPES + SHAPES[1:2] * 2, dtype=torch.float32, structured=True, scale=3.0,
                           **{"lr": 1e-3, **options})
        start = [p.detach().clone() for p in problem.params[False]]
        worst = 0.0
        for _ in range(30):
            problem.step()
            worst = max(worst, problem.worst_relative_difference())
    assert worst < 1e-5, f"fast path departs from the reference by {worst:.2e} (relative) in fp32"
    moved = min(float((p.detach() - p0).norm() / p0.norm()) for p, p0 in zip(problem.params[False], start))
    assert moved > 3e-3, "the comparison must cover a real trajectory"


@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_fast_path_equals_reference_in_fp64_on_random_gradients(options):
    problem = _Problem(SHAPES + SHAPES[1:2] * 2, dtype=torch.float64, structured=False, **{"lr": 1e-2, **options})
    for _ in range(20):
        problem.step()
    assert problem.worst_relative_difference() < 1e-10
    fast_state, ref_state = (problem.optimizers[f].state_dict()["state"] for f in (True, False))
    assert fast_state.keys() == ref_state.keys()
    for index in ref_state:
        assert fast_state[index].keys() == ref_state[index].keys()
        for key, value in ref_state[index].items():
            difference = float((fast_state[index][key] - value).abs().max())
            assert difference <= 1e-9 * max(float(value.abs().max()), 1e-30), (index, key, difference)


@pytest.mark.parametrize(
    "options", [dict(), dict(calibrate=False), dict(weight_decay=0.1), dict(variant="simple")], ids=_ids
)
def test_one_call_native_step_gives_the_bits_of_the_separate_native_calls(options, monkeypatch):
    """``kernels.alternating_step`` (the whole step in one native call) against the four separate calls, which the
    optimizer takes when it returns ``None``: the same parameters and state, bit for bit, over many steps, one of
    them after both factors were changed from outside (so that the one that moves had also changed)."""
    if not native.enabled():
        pytest.skip("the native kernels could not be built here (no C compiler?)")
    one_call = kernels.alternating_step
    calls = {"one": 0, "declined": 0}

    def counted(*args, **kwargs):
        result = one_call(*args, **kwargs)
        calls["one" if result is not None else "declined"] += 1
        return result

    runs = {}
    for name, replacement in (("one", counted), ("separate", lambda *args, **kwargs: None)):
        monkeypatch.setattr(kernels, "alternating_step", replacement)
        shapes = SHAPES + SHAPES[1:2] * 2
        problem = _Problem(shapes, dtype=torch.float32, structured=True, scale=3.0, lr=1e-3, **options)
        for step in range(12):
            if step == 6:
                with torch.no_grad():
                    torch._foreach_mul_(problem.params[True], 1.001)
            problem.step()
        runs[name] = problem
    assert calls["one"] > 0
    one, separate = runs["one"], runs["separate"]
    for p, q in zip(one.params[True], separate.params[True]):
        assert torch.equal(p, q)
    one_state, separate_state = (r.optimizers[True].state_dict()["state"] for r in (one, separate))
    for index, values in separate_state.items():
        for key, value in values.items():
            assert torch.equal(one_state[index][key], value), (index, key)


def _alternating_step_sides(layers, rows_u, rows_v, rank, generator):
    """Inputs for ``kernels.alternating_step``: both factors changed since ``prev``, no pseudo-inverse known."""
    sides = {}
    for name, rows in (("u", rows_u), ("v", rows_v)):
        x = torch.randn(layers, rows, rank, generator=generator)
        sides[name] = dict(
            x=x,
            grad=torch.randn(x.shape, generator=generator),
            exp_avg=torch.randn(x.shape, generator=generator),
            second=torch.rand(layers, rows, maths.packed_size(rank), generator=generator),
            prev=x + 0.01,
            pinv_prev=None,
            pinv_now=None,
            calibrate=True,
        )
    return sides


_STEP_OPTIONS = dict(
    full=True, beta1=0.9, beta2=0.999, lr=1e-3, decay=1.0, bias_correction1=0.1, bias_correction2=0.001, eps=1e-8,
    floor=0.0,
)


@pytest.mark.parametrize("move_b", [True, False], ids=["B moves", "A moves"])
def test_one_call_native_step_writes_into_the_parameters_what_it_returns_otherwise(move_b):
    """The new factor written straight into the parameters' memory (V's (i, b) is A's (b, i)) equals, bit for bit,
    the one returned in the workspace buffer from the same inputs."""
    if not native.enabled():
        pytest.skip("the native kernels could not be built here (no C compiler?)")
    layers, rows_u, rows_v, rank = 3, 40, 24, 5
    results = {}
    for direct in (False, True):
        sides = _alternating_step_sides(layers, rows_u, rows_v, rank, torch.Generator().manual_seed(0))
        params = [torch.full((rows_u, rank) if move_b else (rank, rows_v), float("nan")) for _ in range(layers)]
        strides = params[0].stride() if move_b else params[0].stride()[::-1]
        step, phase = torch.full((layers,), 3.0), torch.zeros(layers, dtype=torch.int64)
        new, *_ = kernels.alternating_step(
            sides, move_b=move_b, workspace=kernels.Workspace(), step=step, phase=phase, next_phase=1,
            destination=params if direct else None, destination_strides=strides, **_STEP_OPTIONS,
        )  # fmt: skip
        assert step.tolist() == [4.0] * layers and phase.tolist() == [1] * layers
        if direct:
            assert new is None
            new = torch.stack(params) if move_b else torch.stack(params).transpose(1, 2)
        results[direct] = new.clone()
    assert torch.isfinite(results[True]).all()
    assert torch.equal(results[True], results[False])


@pytest.mark.parametrize("reason", ["singular Gram matrix", "factor changed in one layer of two"])
def test_one_call_native_step_declines_what_the_separate_calls_handle_before_writing_anything(reason):
    """A Gram matrix whose Cholesky inverse is not accepted, or a factor that changed in some layers only, makes
    ``kernels.alternating_step`` return ``None`` with the state untouched, so that the separate calls (with the
    eigendecomposition, or per-layer calibration) can do the step."""
    if not native.enabled():
        pytest.skip("the native kernels could not be built here (no C compiler?)")
    sides = _alternating_step_sides(2, 12, 9, 4, torch.Generator().manual_seed(0))
    u, u_prev = sides["u"]["x"], sides["u"]["prev"]
    if reason == "singular Gram matrix":
        u[..., 3] = u[..., 2]  # (U^T U) is singular
    else:
        u_prev[1] = u[1]  # U changed in layer 0 only
    before = {(name, key): value.clone() for name, side in sides.items() for key, value in side.items()
              if torch.is_tensor(value)}  # fmt: skip
    step, phase = torch.full((2,), 3.0), torch.zeros(2, dtype=torch.int64)
    result = kernels.alternating_step(
        sides, move_b=True, workspace=kernels.Workspace(), step=step, phase=phase, next_phase=1, **_STEP_OPTIONS
    )
    assert result is None
    assert step.tolist() == [3.0, 3.0] and phase.tolist() == [0, 0]
    for (name, key), value in before.items():
        assert torch.equal(sides[name][key], value), (name, key)


@pytest.mark.parametrize("options", OPTIONS[:2], ids=_ids)
def test_each_layer_as_a_batch_of_its_own_gives_the_batched_result(options):
    problem = _Problem(SHAPES + SHAPES[1:2] * 2, dtype=torch.float64, structured=False, reference=False,
                       **{"lr": 1e-2, **options})
    for _ in range(10):
        problem.step()
    assert problem.worst_relative_difference() < 1e-12


def test_pairs_that_miss_gradients_fall_out_of_step_and_still_match_the_reference():
    """A pair without gradients is not stepped, so its phase and step count lag: the bucket is split and regathered."""
    shapes = [(24, 16, 4)] * 4
    problem = _Problem(shapes, dtype=torch.float64, structured=False, lr=1e-2)
    skips = [(), (1,), (), (1, 2), (3,), (), (0, 1, 2, 3), ()] * 3
    for skip in skips:
        problem.step(skip)
    assert problem.worst_relative_difference() < 1e-10
    phases = {int(problem.optimizers[True].state[b]["moving"]) for b in problem.params[True][0::2]}
    assert len(phases) == 2, "the test must leave the pairs in different phases"


def test_pairs_gaining_state_late_join_the_stacked_state():
    shapes = [(24, 16, 4)] * 3
    problem = _Problem(shapes, dtype=torch.float64, structured=False, lr=1e-2)
    for skip in [(1, 2), (2,), (), ()]:
        problem.step(skip)
    assert problem.worst_relative_difference() < 1e-10


@pytest.mark.parametrize("direction", ["fast-to-reference", "reference-to-fast"])
def test_checkpoints_are_interchangeable_between_fast_and_reference_paths(direction):
    source = direction.startswith("fast")
    problem = _Problem([(24, 16, 4)] * 2 + [(16, 24, 3)], dtype=torch.float64, structured=False, lr=1e-2)
    for _ in range(5):
        problem.step()
    resumed = LoftAdamW(
        [{"params": [nn.Parameter(p.detach().clone()) for p in problem.params[source]], "loft": True}], lr=1e-2
    )
    resumed.load_state_dict(problem.optimizers[source].state_dict())
    resumed.param_groups[0]["foreach"] = not source
    continued = resumed.param_groups[0]["params"]
    for _ in range(6):
        problem.gradients()
        for original, twin in zip(problem.params[source], continued):
            twin.grad = original.grad.clone()
        problem.optimizers[source].step()
        resumed.step()
    pairs = zip(continued, problem.params[source])
    worst = max(float((a.detach() - b.detach()).abs().max() / b.detach().abs().max()) for a, b in pairs)
    assert worst < 1e-10


def test_effective_grad_norm_equals_the_reference_batched_or_layer_by_layer():
    problem = _Problem(SHAPES + SHAPES[1:2] * 2, dtype=torch.float64, structured=False, lr=1e-2, reference=False)
    for _ in range(3):
        problem.step()
        problem.gradients()
        for optimizer in problem.optimizers.values():  # foreach=True, then foreach=False
            expected = reference_effective_grad_norm(optimizer)
            torch.testing.assert_close(optimizer.effective_grad_norm(), expected.to(torch.float64), rtol=1e-12, atol=0)


def test_norm_before_step_leaves_the_step_bit_identical():
    """The step reuses the Gram pseudo-inverses the norm computed; reused or recomputed, they are the same bits."""
    runs = []
    for with_norm in (True, False):
        problem = _Problem([(24, 16, 4)] * 3, dtype=torch.float32, structured=True, lr=1e-3)
        fast = problem.optimizers[True]
        for _ in range(6):
            problem.gradients()
            if with_norm:
                fast.effective_grad_norm()
            fast.step()
        runs.append([p.detach().clone() for p in problem.params[True]])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_state_tensors_are_views_of_the_stacked_state_and_survive_replacement():
    problem = _Problem([(24, 16, 4)] * 2, dtype=torch.float64, structured=False, lr=1e-2)
    problem.step()
    fast = problem.optimizers[True]
    b0, b1 = problem.params[True][0], problem.params[True][2]
    assert fast.state[b0]["exp_avg"].data_ptr() != fast.state[b1]["exp_avg"].data_ptr()
    assert fast.state[b0]["exp_avg"].untyped_storage().data_ptr() == fast.state[b1]["exp_avg"].untyped_storage().data_ptr()
    # Replacing a state tensor by hand (as load_state_dict does) is noticed: the stacked state is rebuilt from it.
    fast.state[b0]["exp_avg"] = fast.state[b0]["exp_avg"].clone()
    problem.optimizers[False].state[problem.params[False][0]]["exp_avg"] = problem.optimizers[False].state[
        problem.params[False][0]
    ]["exp_avg"].clone()
    for _ in range(3):
        problem.step()
    assert problem.worst_relative_difference() < 1e-10


# ------------------------------------------------------------------------------------------------- kernel functions
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_spd_pinv_equals_gram_pinv_on_regular_and_singular_grams(backend, dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    factors = [
        torch.randn(40, 6, generator=generator, dtype=dtype),  # well conditioned: Cholesky
        torch.zeros(40, 6, dtype=dtype),  # B at its zero initialisation: exactly zero
        torch.randn(40, 3, generator=generator, dtype=dtype) @ torch.randn(3, 6, generator=generator, dtype=dtype),
        torch.cat([torch.randn(4, 6, generator=generator, dtype=dtype), torch.zeros(36, 6, dtype=dtype)]),  # r > rows
        torch.randn(40, 6, generator=generator, dtype=dtype) * torch.logspace(0, -5, 6, dtype=dtype),  # cond ~1e10
    ]
    fast = kernels.gram_pinv(torch.stack(factors))
    for got, factor in zip(fast, factors):
        expected = maths.gram_pinv(factor)
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= tolerance * max(scale, 1e-30)
    assert torch.equal(fast[1], torch.zeros_like(fast[1]))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_gram_pinv_and_calibration_equal_the_reference_and_the_separate_calibration_bit_for_bit(
    backend, dtype, tolerance
):
    """Eq. (7)'s C from the fused call equals maths.calibration_matrix (strided factors as V = A^T is, a singular
    Gram whose inverse takes the eigendecomposition), and equals the separate calibration_matrices call on the same
    inverse bit for bit: the step takes the former, or the latter when the norm computation already gave the inverse."""
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(3, 6, 40, generator=generator, dtype=dtype).transpose(1, 2)  # (L, l, r), strided
    y[1, :, 3:] = y[1, :, :3] @ torch.randn(3, 3, generator=generator, dtype=dtype)  # rank 3 of 6: rejected
    prev = y + 0.1 * torch.randn(3, 40, 6, generator=generator, dtype=dtype)
    pinv, calibration = kernels.gram_pinv_and_calibration(y, prev)
    for i in range(3):
        expected = maths.calibration_matrix(prev[i], y[i], maths.gram_pinv(y[i]))
        scale = float(expected.abs().max())
        assert float((calibration[i] - expected).abs().max()) <= tolerance * scale
    assert torch.equal(kernels.calibration_matrices(prev, y, pinv), calibration)
    assert torch.equal(kernels.gram_pinv(y), pinv)


def test_packed_batch_functions_equal_the_reference_functions():
    generator = torch.Generator().manual_seed(0)
    for rank in (1, 2, 5):
        calib = torch.randn(3, rank, rank, generator=generator, dtype=torch.float64)
        y = torch.randn(3, 7, rank, generator=generator, dtype=torch.float64)
        batched = kernels.packed_congruence(calib)
        khatri_rao = kernels.packed_khatri_rao(y.transpose(1, 2), scale=3.0)
        outer = kernels.packed_outer(y)
        for i in range(3):
            torch.testing.assert_close(batched[i], maths.packed_congruence(calib[i]), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(khatri_rao[i], 3.0 * maths.packed_khatri_rao(y[i]), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(outer[i], maths.packed_outer(y[i]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("rank, rows", [(1, 9), (3, 9), (16, 600)])
def test_update_cross_terms_equals_reference(backend, dtype, tolerance, rank, rows):
    generator = torch.Generator().manual_seed(rank)
    calib = torch.randn(2, rank, rank, generator=generator, dtype=dtype)
    scaled = torch.randn(2, rows, rank, generator=generator, dtype=dtype)
    cross = kernels.packed_outer(torch.rand(2, rows, rank, generator=generator, dtype=dtype))
    for calibration in (calib, None):
        updated = cross.clone()
        kernels.update_cross_terms_(updated, calibration, scaled, 0.99)
        for i in range(2):
            congruence = None if calibration is None else maths.packed_congruence(calibration[i])
            expected = maths.update_cross_terms(cross[i], congruence, scaled[i], 0.99)
            assert float((updated[i] - expected).abs().max() / expected.abs().max()) < tolerance


def _direction_inputs(dtype, layers=3, rows=37, length=29, rank=5, seed=0):
    """Moments of several positive gradients against a positive factor: ``m~`` and ``v~`` do not cancel."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.rand(layers, length, rank, generator=generator, dtype=dtype) + 0.2
    grads = torch.rand(4, layers, rows, rank, generator=generator, dtype=dtype)
    exp_avg = grads.mean(0)
    cross = kernels.packed_outer(grads).mean(0)
    x = torch.randn(layers, rows, rank, generator=generator, dtype=dtype)
    return x, exp_avg, cross, y


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("floor", [0.0, maths.second_moment_floor(0.9, 0.999)])
@pytest.mark.parametrize("block_elements", [1, 100, kernels.DEFAULT_BLOCK_ELEMENTS])
def test_projected_adam_update_equals_reference_direction(backend, dtype, tolerance, floor, block_elements):
    x, exp_avg, cross, y = _direction_inputs(dtype)
    pinv = torch.stack([maths.gram_pinv(layer) for layer in y])
    options = dict(bias_correction1=0.271, bias_correction2=0.003, eps=1e-8)
    new = kernels.projected_adam_update(
        x, exp_avg, cross, y, pinv, lr=0.05, decay=0.99, floor=floor, block_elements=block_elements, **options
    )
    for i in range(x.shape[0]):
        direction = maths.projected_adam_direction(exp_avg[i], cross[i], y[i], pinv[i], floor=floor, **options)
        expected = 0.99 * x[i] - 0.05 * direction
        assert float((new[i] - expected).abs().max() / expected.abs().max()) < tolerance


@pytest.mark.parametrize("floor", [0.0, maths.second_moment_floor(0.9, 0.999)])
def test_compiled_elementwise_step_equals_eager(floor):
    """The optional torch.compile-d pass gives the eager result (skipped where this machine cannot compile)."""
    x, exp_avg, cross, y = _direction_inputs(torch.float32, rows=300, length=257)
    pinv = torch.stack([maths.gram_pinv(layer) for layer in y])
    options = dict(lr=0.05, decay=0.99, bias_correction1=0.271, bias_correction2=0.003, eps=1e-8, floor=floor)
    eager = kernels.projected_adam_update(x, exp_avg, cross, y, pinv, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a machine without a compiler warns and falls back; both must agree
        fused = kernels.projected_adam_update(x, exp_avg, cross, y, pinv, compiled=True, **options)
    if kernels._FUSED_RATIO == [None]:
        pytest.skip("torch.compile is unavailable here; the compiled call fell back to the eager path")
    for a, b in zip(fused, eager):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-6


@pytest.mark.parametrize("budget_elements", [20_000, 40_000, 100_000])
@pytest.mark.parametrize("floor", [0.0, maths.second_moment_floor(0.9, 0.999)])
def test_device_path_tiles_equal_reference_across_layer_column_and_row_seams(budget_elements, floor):
    """With small budgets the device path splits block 5 into chunks of layers, of columns and of rows (each budget
    here splits at least two of them, with uneven tails), and the carried cross terms into row blocks: the results
    equal the float64 references."""
    layers, rows, length, rank = 3, 300, 530, 5
    x, exp_avg, cross, y = _direction_inputs(torch.float64, layers=layers, rows=rows, length=length, rank=rank)
    chunk, columns, step = kernels._device_tiling(layers, rows, length, rank, budget_elements, False)
    assert sum((chunk < layers, columns < length, step < rows)) >= 2, "the budget must split the tiles"
    pinv = torch.stack([maths.gram_pinv(layer) for layer in y])
    options = dict(bias_correction1=0.271, bias_correction2=0.003, eps=1e-8)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(layers, rank, rank, generator=generator, dtype=torch.float64)
    scaled = torch.randn(layers, rows, rank, generator=generator, dtype=torch.float64)
    with _backend("device"):
        new = kernels.projected_adam_update(x, exp_avg, cross, y, pinv, lr=0.05, decay=0.99, floor=floor,
                                            budget=budget_elements * 8, **options)
        carried = cross.clone()
        kernels.update_cross_terms_(carried, calibration, scaled, 0.99, budget=budget_elements * 8)
    for i in range(layers):
        direction = maths.projected_adam_direction(exp_avg[i], cross[i], y[i], pinv[i], floor=floor, **options)
        torch.testing.assert_close(new[i], 0.99 * x[i] - 0.05 * direction, rtol=1e-10, atol=1e-12)
        expected = maths.update_cross_terms(cross[i], maths.packed_congruence(calibration[i]), scaled[i], 0.99)
        torch.testing.assert_close(carried[i], expected, rtol=1e-10, atol=1e-12)


def test_projected_adam_update_applies_the_floor_where_v_cancels():
    """Where the rebuilt v~ is negative, the fast update uses the same Cauchy-Schwarz floor as the reference."""
    x, exp_avg, cross, y = _direction_inputs(torch.float64, layers=1)
    cross = torch.full_like(cross, -1e-12)
    pinv = torch.stack([maths.gram_pinv(layer) for layer in y])
    floor = maths.second_moment_floor(0.9, 0.999)
    options = dict(bias_correction1=1.0, bias_correction2=1.0, eps=1e-8, floor=floor)
    new = kernels.projected_adam_update(x, exp_avg, cross, y, pinv, lr=1.0, decay=1.0, **options)
    expected = x[0] - maths.projected_adam_direction(exp_avg[0], cross[0], y[0], pinv[0], **options)
    torch.testing.assert_close(new[0], expected, rtol=1e-12, atol=1e-12)


def test_projected_adam_update_allocates_no_temporary_larger_than_a_block(backend):
    """No single allocation comes near the (k, l) size: the full update never exists whole. The torch paths hold a
    block of rows (small here) and the (R, l) Khatri-Rao matrix; the native kernels only that matrix and the other
    factor's (r, l) two, no row block at all."""
    if backend == "device":
        pytest.skip("the device path sizes its blocks by memory_budget: tests/test_gpu_path.py checks that bound")
    rows, length, rank = 512, 384, 4
    x, exp_avg, cross, y = _direction_inputs(torch.float32, layers=1, rows=rows, length=length, rank=rank)
    pinv = torch.stack([maths.gram_pinv(layer) for layer in y])
    options = dict(bias_correction1=0.1, bias_correction2=0.01, eps=1e-8, floor=0.01, lr=1e-3, decay=1.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        kernels.projected_adam_update(x, exp_avg, cross, y, pinv, block_elements=8 * length, **options)
    largest = max(event.cpu_memory_usage for event in profile.events())
    block_bytes = 8 * length * 4
    column_matrices_bytes = (2 * rank + maths.packed_size(rank)) * (length + 32) * 4  # rows padded for alignment
    assert largest > 0, "the profiler must see the allocations"
    assert largest <= max(2 * block_bytes, column_matrices_bytes) < rows * length * 4 // 16


@pytest.mark.parametrize("rank", [1, 5, 16, 20, 33])
@pytest.mark.parametrize("floor", [0.0, maths.second_moment_floor(0.9, 0.999)])
def test_native_projected_update_equals_float64_reference_across_row_chunks_and_column_blocks(rank, floor):
    """The C kernel's tiling seams: 300 rows (chunks of 32, tiles of 4, a tail row), 530 columns (blocks of 256, a
    tail vector, padding), two layers, a strided other factor, ranks below, at and past whole vectors of 16 (the
    projection's sums are reduced 16 at a time, the rest one by one); against the reference direction in float64."""
    if not native.enabled():
        pytest.skip("the native kernels could not be built here (no C compiler?)")
    x, exp_avg, cross, y = _direction_inputs(torch.float64, layers=2, rows=300, length=530, rank=rank)
    y = y.transpose(1, 2).contiguous().transpose(1, 2)  # as V = A^T: strided along the rows
    pinv = torch.stack([maths.gram_pinv(layer) for layer in y])
    options = dict(bias_correction1=0.271, bias_correction2=0.003, eps=1e-8)
    with _backend("native"):
        new = kernels.projected_adam_update(
            *(t.float() for t in (x, exp_avg, cross)), y.float(), pinv.float(), lr=0.05, decay=0.99, floor=floor,
            **options,
        )
    for i in range(2):
        direction = maths.projected_adam_direction(exp_avg[i], cross[i], y[i], pinv[i], floor=floor, **options)
        expected = 0.99 * x[i] - 0.05 * direction
        assert float((new[i].double() - expected).abs().max() / expected.abs().max()) < 1e-5


@pytest.mark.parametrize("floor", [0.0, 0.01])
def test_native_projected_update_lets_nans_through_as_the_torch_operations_do(floor):
    """A NaN in a row's cross terms (v~) or first moment (m~) makes that row's new factor NaN with the C kernel as
    with the PyTorch operations (whose maximum keeps NaNs), and leaves the other rows finite."""
    if not native.enabled():
        pytest.skip("the native kernels could not be built here (no C compiler?)")
    x, exp_avg, cross, y = (t.float() for t in _direction_inputs(torch.float64, layers=1, rows=40, length=70, rank=6))
    cross[0, 3, 5] = float("nan")
    exp_avg[0, 17, 2] = float("nan")
    pinv = kernels.gram_pinv(y)
    options = dict(lr=0.05, decay=1.0, bias_correction1=0.271, bias_correction2=0.003, eps=1e-8, floor=floor)
    results = {}
    for name in ("native", "bmm"):
        with _backend(name):
            results[name] = kernels.projected_adam_update(x, exp_avg, cross, y, pinv, **options)[0]
    for new in results.values():
        assert torch.isnan(new[[3, 17]]).all(dim=1).all()
    assert torch.equal(torch.isnan(results["native"]), torch.isnan(results["bmm"]))
    assert torch.isfinite(results["native"][[0, 1, 2, 4, 16, 18, 39]]).all()


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("beta1", [0.9, 0.0])
@pytest.mark.parametrize("rank, rows", [(1, 9), (5, 37), (16, 131), (33, 21)])  # 33: carried as C^T P C
def test_native_moment_update_equals_the_torch_operations(full, beta1, rank, rows):
    """Blocks 2-4 in the C kernel (scaled gradient, calibrated first moment, carried cross terms or LoFT-simple's
    second moment) give what the PyTorch operations give, with and without a calibration, on strided gradients."""
    if not native.enabled():
        pytest.skip("the native kernels could not be built here (no C compiler?)")
    _check_native_moments_against_torch(full, beta1, rank, rows)


def _check_native_moments_against_torch(full, beta1, rank, rows):
    generator = torch.Generator().manual_seed(rank)
    grad = torch.randn(3, rank, rows, generator=generator).transpose(1, 2)  # V's gradient is a transposed view
    y = torch.randn(3, 2 * rank + 3, rank, generator=generator)
    pinv = kernels.gram_pinv(y)
    calibration = torch.eye(rank) + 0.1 * torch.randn(3, rank, rank, generator=generator)
    exp_avg = torch.randn(3, rows, rank, generator=generator)
    packed = kernels.packed_outer(torch.randn(3, rows, rank, generator=generator))
    second = packed if full else torch.rand(3, rows, rank, generator=generator)
    for calib in (calibration, None):
        results = {}
        for backend in ("native", "bmm"):
            with _backend(backend):
                state = exp_avg.clone(), second.clone()
                kernels.update_moments_(
                    grad, pinv, calib, *state, beta1=beta1, beta2=0.99, full=full, workspace=kernels.Workspace()
                )
                results[backend] = state
        for got, expected in zip(results["native"], results["bmm"]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _assert_fast_path_steps_to_the_reference():
    problem = _Problem(SHAPES[:3], dtype=torch.float32, structured=True, lr=1e-3)
    for _ in range(3):
        problem.step()
    assert problem.worst_relative_difference() < 1e-5


def _skip_unless_the_kernels_can_build_here():
    import platform

    if platform.system() != "Linux" or native._compiler() is None:
        pytest.skip("no C compiler on Linux here: the PyTorch operations are used")
    if not native.cpu_supported():
        pytest.skip("no AVX2 or AVX-512 on this CPU: the PyTorch operations are used")
    if os.environ.get("LOFT_PEFT_NATIVE") == "0":
        pytest.skip("the native kernels are disabled by LOFT_PEFT_NATIVE=0")


def test_native_kernels_built_for_avx2_equal_the_torch_operations(tmp_path, monkeypatch):
    """The kernels as CPUs without AVX-512 build them (8-float vectors, lane-by-lane masked moves; here with
    ``-mno-avx512f``) compute blocks 2-5 as the PyTorch operations do, at ranks below, at and past a vector."""
    _skip_unless_the_kernels_can_build_here()
    monkeypatch.setattr(native, "FLAGS", native.FLAGS + ("-mno-avx512f",))
    monkeypatch.setenv("LOFT_PEFT_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None, "the kernels must build without AVX-512"
        with _backend("native"):
            for full, rank in ((True, 5), (True, 8), (True, 16), (False, 16)):
                _check_native_moments_against_torch(full, 0.9, rank, 37)
        for rank in (5, 8, 16, 20):
            test_native_projected_update_equals_float64_reference_across_row_chunks_and_column_blocks(rank, 0.01)
        assert list(tmp_path.glob("*.so")), "the build without AVX-512 must have been the one used"
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def test_native_kernels_build_where_a_c_compiler_and_a_supported_cpu_exist():
    """On a Linux machine with a C compiler and an AVX2 or AVX-512 CPU the fused kernels must build and load: a silent
    fall-back to the PyTorch operations would leave every native test above skipped."""
    _skip_unless_the_kernels_can_build_here()
    assert native.library() is not None
    assert native.enabled()


def test_native_kernels_are_not_used_on_other_cpus(tmp_path, monkeypatch, caplog):
    """On a CPU the kernels are not made for (no AVX2 or AVX-512) nothing is compiled, the reason is logged, and the
    optimizer steps through the PyTorch operations to the reference's result."""
    import logging

    monkeypatch.setattr(native, "cpu_supported", lambda: False)
    monkeypatch.delenv("LOFT_PEFT_NATIVE", raising=False)
    monkeypatch.setenv("LOFT_PEFT_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="loft_peft.optim.native"):
            assert native.library() is None
        assert "AVX2 or AVX-512" in caplog.text
        assert not list(tmp_path.glob("*.so"))
        _assert_fast_path_steps_to_the_reference()
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


def test_native_kernels_fall_back_to_pytorch_with_a_warning_when_the_build_fails(tmp_path, monkeypatch, caplog):
    """A compiler that fails leaves a logged warning, no library in the cache, and an optimizer that still steps
    (through the PyTorch operations) to the reference's result."""
    import logging

    _skip_unless_the_kernels_can_build_here()

    monkeypatch.setenv("CC", "false")  # on PATH, fails on every call, including --version
    monkeypatch.setenv("LOFT_PEFT_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="loft_peft.optim.native"):
            assert native.library() is None
        assert "native kernels unavailable" in caplog.text
        assert not native.enabled()
        assert not list(tmp_path.glob("*.so")), "a failed build must leave nothing in the cache"
        _assert_fast_path_steps_to_the_reference()
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    assert native.enabled() or native._compiler() is None
