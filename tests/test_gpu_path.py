"""What the optimizer step does on a GPU, shown on the CPU.

Tensors on the ``meta`` device have shapes and no data, like a GPU's values seen from the host: the step takes the
path it takes for every device that is not the CPU. :class:`DeviceWatch` refuses what would stall a GPU (reading a
value on the host: ``item``, ``equal``, ``tolist``, ``bool``, ``nonzero``) and ops that mix a device tensor with a
CPU tensor of dim > 0 (a crash on CUDA), and counts the operations and the bytes of the tensors they create.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from loft_peft import LoftAdamW

# Ops whose result the host must read (a device-to-host synchronisation on a GPU), and ops whose CUDA kernels read
# their error codes on the host (the meta kernels do not show it): the error check of linalg's functions without
# "_ex", eigh and SVD (behind pinv), cholesky_inverse.
HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "item", "masked_select", "unique",
              "_linalg_check_errors", "_linalg_eigh", "_linalg_svd", "cholesky_inverse", "linalg_inv"}
# Ops that make a view (new shape or strides over the same storage): dispatched on the host, no kernel launched.
VIEW_OPS = {"view", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "t", "permute", "expand", "detach", "alias",
            "slice", "select", "split", "split_with_sizes", "unbind", "diagonal", "as_strided", "_reshape_alias"}


class DeviceWatch(TorchDispatchMode):
    """Refuses host reads of device values and device mixes; counts aten ops (``ops``: those on a device tensor, of
    which ``views`` only make views and the others launch a kernel on a GPU; ``host_ops``: those on CPU tensors only,
    such as reading the step counts) and the bytes of the tensors created."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.views = 0
        self.host_ops = 0
        self.created_bytes = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        on_device = [t for t in tensors if t.device.type != "cpu"]
        name = func.overloadpacket.__name__
        if on_device and name in HOST_READS:
            raise AssertionError(f"host synchronisation: {func} on a {on_device[0].device.type} tensor")
        if on_device and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            raise AssertionError(f"device mix: {func} on {[(t.device.type, tuple(t.shape)) for t in tensors]}")
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if on_device or any(t.device.type != "cpu" for t in outputs):
            self.ops += 1
            self.views += name in VIEW_OPS
            self.names[name] = self.names.get(name, 0) + 1
        else:
            self.host_ops += 1
        inputs = {id(t) for t in tensors}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and t.device.type != "cpu":
                self.created_bytes += t.numel() * t.element_size()
        return out


def meta_pairs(shapes: list[tuple[int, int, int]], device: str = "meta") -> list[torch.Tensor]:
    """[loft_B, loft_A, ...] for layers (out, in, r), each with a gradient, on ``device``."""
    params = []
    for out_features, in_features, rank in shapes:
        b = torch.nn.Parameter(torch.empty(out_features, rank, device=device))
        a = torch.nn.Parameter(torch.empty(rank, in_features, device=device))
        b.grad, a.grad = torch.empty_like(b), torch.empty_like(a)
        params += [b, a]
    return params


def llama3_8b_shapes(rank: int, layers: int = 32) -> list[tuple[int, int, int]]:
    """q, k, v, up and down of LLaMA-3-8B (hidden 4096, 8 KV heads of 128, MLP 14336), ``layers`` times."""
    per_layer = [(4096, 4096), (1024, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
    return [(o, i, rank) for _ in range(layers) for o, i in per_layer]


def _optimizer(params, **options):
    return LoftAdamW([{"params": params, "loft": True}], lr=1e-3, **options)


@pytest.mark.parametrize("variant", ["full", "simple"])
@pytest.mark.parametrize("clip", [False, True])
def test_step_on_device_tensors_has_no_host_sync_and_no_device_mix(variant, clip):
    params = meta_pairs([(48, 40, 4), (48, 40, 4), (24, 40, 4)])
    optimizer = _optimizer(params, variant=variant)
    for _ in range(3):  # B moves, A moves, B moves: every phase, with the state's first creation
        with DeviceWatch():
            if clip:
                optimizer.clip_grad_norm_(1.0)
            optimizer.step()


class LiveBytes(DeviceWatch):
    """:class:`DeviceWatch` that also follows the storages the ops create until no tensor holds them: ``peak`` is the
    most bytes alive at once (the step's temporaries, plus any state it creates)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.storages: dict[int, list[int]] = {}  # storage -> [bytes, tensors holding it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_dispatch__(func, types, args, kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "cpu":
                continue
            key = t.untyped_storage()._cdata
            entry = self.storages.get(key)
            if entry is None:
                if any(isinstance(a, torch.Tensor) and a.untyped_storage()._cdata == key
                       for a in tree_leaves((args, kwargs))):
                    continue  # a view or an in-place result of a tensor made before the watch
                entry = self.storages[key] = [t.untyped_storage().nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._released, key)
        return out

    def _released(self, key):
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]


GEMMS = {"bmm", "baddbmm", "mm", "addmm", "matmul"}


class RooflineWatch(LiveBytes):
    """:class:`LiveBytes` that also adds up, over the operations that launch a kernel, the bytes they read and write
    (their tensor arguments and results, as dense tensors) and the flops of their GEMMs, and ``seconds``: for each
    operation the larger of its bytes over ``bandwidth`` (bytes/s) and its flops over ``fp32_flops`` (flop/s), summed,
    a lower bound of the time a device with those peaks spends on the step."""

    def __init__(self, bandwidth: float, fp32_flops: float):
        super().__init__()
        self.bandwidth, self.fp32_flops = bandwidth, fp32_flops  # bytes/s, flop/s
        self.flops = 0
        self.bytes = 0
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = func.overloadpacket.__name__
        inputs = [t for t in tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
                  if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
        if not inputs or name in VIEW_OPS:
            return out
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
        flops = 0
        if name in GEMMS:
            result = outputs[0]
            inner = (args[0] if name in {"bmm", "mm", "matmul"} else args[1]).shape[-1]  # (.., n, k) @ (.., k, m)
            flops = 2 * result.numel() * inner
        self.bytes += moved
        self.flops += flops
        self.seconds += max(moved / self.bandwidth, flops / self.fp32_flops)
        return out


def _step_counts(shapes, steps=3, watch=None, **options):
    """Ops and peak temporary bytes of the last of ``steps`` clipped steps on meta tensors (the state exists then),
    watched by ``watch`` (a fresh :class:`LiveBytes` by default)."""
    params = meta_pairs(shapes)
    optimizer = _optimizer(params, **options)
    for _ in range(steps - 1):
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
    watch = LiveBytes() if watch is None else watch
    with watch:
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
    return watch


@pytest.mark.parametrize("rank", [16, 64, 128])
def test_the_step_temporaries_stay_within_the_memory_budget(rank):
    budget = 256 << 20
    shapes = [(14336, 4096, rank)] * 8  # 8 layers of LLaMA-3-8B's up projection
    peak = max(_step_counts(shapes, steps=s, memory_budget=budget).peak for s in (2, 3))
    assert peak <= budget, f"{peak / 2**20:.0f} MiB of temporaries at r={rank} (budget {budget / 2**20:.0f} MiB)"


def test_a_smaller_budget_bounds_the_temporaries_of_many_layers():
    budget = 64 << 20
    peak = max(_step_counts([(14336, 4096, 16)] * 32, steps=s, memory_budget=budget).peak for s in (2, 3))
    assert peak <= budget, f"{peak / 2**20:.0f} MiB of temporaries for 32 layers (budget 64 MiB)"


def test_a_step_on_llama3_8b_shapes_takes_at_most_3000_aten_operations_at_r16():
    """Clip and step on 32 layers x (q, k, v, up, down) at r = 16 with the default 256 MiB budget, in both phases:
    at most 3,000 aten operations on device tensors, views included (those that launch a kernel cost 5-10 us of host
    time each; views launch none)."""
    for steps in (2, 3):  # B moves, then A moves
        watch = _step_counts(llama3_8b_shapes(16), steps=steps)
        assert watch.ops <= 3000, f"{watch.ops} aten operations in step {steps} ({watch.ops - watch.views} launches)"


@pytest.mark.parametrize("rank", [16, 64])
def test_a_step_on_llama3_8b_shapes_keeps_a_gpu_busier_than_its_launches_keep_the_host(rank):
    """At an H200's peaks (4.8 TB/s, 67 fp32 TFLOP/s) the device's least time for the step's operations exceeds the
    host's time to launch them at 10 us each, in both phases: the launches queue ahead of the GPU instead of leaving
    it waiting. Small blocks fail it: with ``memory_budget=8 << 20`` a step at r = 16 is 70,089 launches (0.70 s at
    10 us) for 96 ms of device time."""
    for steps in (2, 3):
        watch = _step_counts(llama3_8b_shapes(rank), steps=steps, watch=RooflineWatch(4.8e12, 67e12))
        launches = watch.ops - watch.views
        assert watch.seconds > launches * 10e-6, (
            f"step {steps}: {launches} launches take {launches * 10e-3:.0f} ms at 10 us, the device "
            f"{watch.seconds * 1e3:.0f} ms at its peaks")


def test_the_gram_pseudo_inverses_of_many_layers_stay_within_the_memory_budget():
    # The clip inverts the (r, r) Gram matrices of every bucket in batched calls; at r = 128 each takes ~1.5 MB of
    # float64 temporaries, so 200 small layers at once would be ~250 MB: the calls are split to fit the budget.
    budget = 64 << 20
    peak = max(_step_counts([(256, 256, 128)] * 200, steps=s, memory_budget=budget).peak for s in (2, 3))
    assert peak <= budget, f"{peak / 2**20:.0f} MiB of temporaries for 200 layers at r=128 (budget 64 MiB)"


@pytest.mark.parametrize("options", [dict(alternate=False), dict(calibrate=False), dict(variant="simple",
                                     simple_rescale=True), dict(weight_decay=0.1)], ids=str)
def test_step_options_on_device_tensors_have_no_host_sync(options):
    params = meta_pairs([(48, 40, 4), (48, 40, 4)])
    optimizer = _optimizer(params, **options)
    for _ in range(3):
        with DeviceWatch():
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()


def test_pairs_without_gradients_and_plain_parameters_on_device_tensors_have_no_host_sync():
    params = meta_pairs([(48, 40, 4), (48, 40, 4), (48, 40, 4)])
    bias = torch.nn.Parameter(torch.empty(48, device="meta"))
    bias.grad = torch.empty_like(bias)
    optimizer = LoftAdamW([{"params": params, "loft": True}, {"params": [bias], "loft": False}], lr=1e-3)
    optimizer.step()
    params[2].grad = params[3].grad = None  # the second pair sits this step out: it falls out of step
    with DeviceWatch():
        optimizer.step()
    params[2].grad, params[3].grad = torch.empty_like(params[2]), torch.empty_like(params[3])
    for _ in range(2):  # pairs in different phases: gathered, stepped and scattered back
        with DeviceWatch():
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()


def test_a_resumed_optimizer_on_device_tensors_has_no_host_sync():
    params = meta_pairs([(48, 40, 4), (24, 40, 4)])
    optimizer = _optimizer(params)
    for _ in range(3):
        optimizer.step()
    saved = optimizer.state_dict()
    resumed = _optimizer(params)
    resumed.load_state_dict(saved)
    assert all(resumed.state[p]["moving"].device.type == "cpu" for p in params[0::2])  # phases stay on the host
    for _ in range(2):
        with DeviceWatch():
            resumed.clip_grad_norm_(1.0)
            resumed.step()


class MatmulPrecision(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "bmm", "baddbmm", "addmm", "matmul"):
            self.seen.add(torch.get_float32_matmul_precision())
        return func(*args, **(kwargs or {}))


def test_the_step_runs_its_gemms_in_full_fp32_whatever_the_tf32_setting():
    params = meta_pairs([(48, 40, 4), (24, 40, 4)])
    optimizer = _optimizer(params)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere and later
    try:
        watch = MatmulPrecision()
        with watch:
            for _ in range(2):
                optimizer.clip_grad_norm_(1.0)
                optimizer.step()
        assert watch.seen == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"  # the user's setting, back after the step
    finally:
        torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("rank, rows", [(4, 2), (4, 3), (8, 100), (16, 10), (16, 40)])
def test_the_device_paths_pseudo_inverse_equals_the_reference_in_float64_with_no_eigendecomposition(rank, rows):
    # On a GPU linalg.eigh (behind the reference) reads its error code on the host; kernels.soft_pinv takes a QR.
    from loft_peft.optim import kernels

    generator = torch.Generator().manual_seed(rank * rows)
    y = torch.randn(5, rows, rank, generator=generator)
    y[1] = 0.0  # B at its zero initialisation: exactly zero
    y[2, :, 0] = y[2, :, 1] * 1e-4  # ill-conditioned
    y[3, :, : rank // 2] = y[3, :, rank // 2 : 2 * (rank // 2)]  # rank-deficient
    gram = y.mT @ y
    got = kernels.soft_pinv(gram)
    y64 = y.double()
    expected = torch.linalg.pinv(y64.mT @ y64, hermitian=True, rtol=rank * torch.finfo(torch.float32).eps)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    for i in range(5):
        scale = float(expected[i].abs().max()) or 1.0
        assert float((got[i].double() - expected[i]).abs().max()) <= 1e-5 * scale, i


@pytest.mark.parametrize("options", [dict(), dict(nesterov=True), dict(alternate=False)], ids=str)
def test_loft_muon_on_device_tensors_has_no_host_sync(options):
    from loft_peft import LoftMuon

    params = meta_pairs([(48, 40, 4), (48, 40, 4), (24, 40, 4)])
    optimizer = LoftMuon([{"params": params, "loft": True}], lr=1e-3, **options)
    for _ in range(3):
        with DeviceWatch():
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()
