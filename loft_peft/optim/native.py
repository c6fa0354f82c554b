"""The fused CPU kernels of ``csrc/loft_cpu.c``: built on first use with the system's C compiler, loaded by ctypes.

The LoFT-AdamW step's large work on a CPU is block 5's rebuild of the (k, l) moments and the carrying of the cross
terms (eq. 11). As PyTorch operations these are a dozen passes over memory and a hundred small calls per step; the C
kernels do a row block's whole computation while it is in cache (see the file's header). They compute what the
functions of :mod:`loft_peft.optim.kernels` compute, in fp32, up to rounding. :func:`alternating_step` runs a whole
alternating step in one call, so that a small layer's step is not mostly Python and ctypes around four calls.

The library is compiled once per machine and source (``cc -O3 -march=native -fopenmp``, under a second) into
``$LOFT_PEFT_CACHE`` (default ``~/.cache/loft_peft``), written atomically so that concurrent processes can share it.
It is used on Linux x86-64 CPUs with AVX2 or AVX-512. Elsewhere, where there is no compiler, compiling fails, or
``LOFT_PEFT_NATIVE=0`` is set (:func:`library` returns ``None``, with a logged reason), the optimizer uses PyTorch
operations; nothing else changes. OpenMP: the library links ``libgomp.so.1``, the runtime PyTorch's Linux wheels
load under that name, so the two share one thread pool; each call asks for ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .device import takes_device_path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "loft_cpu.c"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
# Largest rank the kernels take (they keep a row of the factor in a fixed-size stack array).
MAX_RANK = 256

# Whether to use the kernels: None (the default) uses them where they load; False never. Tests and benchmarks set it.
USE_NATIVE: bool | None = None


def enabled() -> bool:
    """Whether the kernels are used: they loaded here (:func:`library`) and :data:`USE_NATIVE` is not ``False``."""
    return USE_NATIVE is not False and library() is not None


def usable(x: Tensor) -> bool:
    """Whether factors like ``x`` (L, k, r) go through the kernels: fp32 on the CPU, r at most :data:`MAX_RANK`."""
    return not takes_device_path(x) and x.dtype == torch.float32 and x.shape[-1] <= MAX_RANK and enabled()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    root = os.environ.get("LOFT_PEFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "loft_peft")
    return Path(root)


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


def cpu_supported() -> bool:
    """Whether this CPU runs the kernels faster than the PyTorch operations: x86-64 with AVX-512 (16-float vectors)
    or with AVX2 and FMA (8-float ones), from the flags of ``/proc/cpuinfo``.

    Measured on 1024 x 512 layers with PyTorch held to the same instructions: the AVX2 build steps LoFT 2-3x faster
    than the PyTorch operations. Other CPUs (ARM, older x86) keep the PyTorch operations: the kernels were not
    measured there.
    """
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        return False
    return "avx512f" in flags or {"avx2", "fma"} <= flags


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` where they cannot be built or loaded here, the CPU is not one they are made
    for (:func:`cpu_supported`) or ``LOFT_PEFT_NATIVE=0`` is set (read once, when the kernels are first needed;
    logged)."""
    if os.environ.get("LOFT_PEFT_NATIVE", "1") == "0":
        logger.info("LoFT native kernels: disabled by LOFT_PEFT_NATIVE=0; using PyTorch operations.")
        return None
    if platform.system() != "Linux":
        logger.info("LoFT native kernels: only built on Linux; using PyTorch operations.")
        return None
    if not cpu_supported():
        logger.info("LoFT native kernels: made for x86-64 CPUs with AVX2 or AVX-512; using PyTorch operations.")
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("LoFT native kernels: no C compiler found (cc, gcc, clang or $CC); using PyTorch operations.")
        return None
    try:
        source = SOURCE.read_bytes()
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256(source + repr((FLAGS, version, _cpu_signature())).encode()).hexdigest()[:16]
        target = _cache_dir() / f"loft_cpu_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                built = Path(scratch) / target.name
                result = subprocess.run(
                    [compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True
                )
                if result.returncode != 0:
                    raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
                os.replace(built, target)  # atomic: another process sees no library or a whole one
        handle = ctypes.CDLL(str(target))
    except Exception as error:  # noqa: BLE001 - any failure leaves the (always correct) PyTorch path
        logger.warning("LoFT native kernels unavailable (%s); using PyTorch operations.", error)
        return None
    _declare(handle)
    # Scratch sizes depend on the build (its vector width): forget those of a library loaded before this one.
    projected_adam_scratch_size.cache_clear()
    update_moments_scratch_size.cache_clear()
    _step_layout.cache_clear()
    return handle


def _declare(handle: ctypes.CDLL) -> None:
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    handle.loft_projected_adam_scratch.argtypes = [i64, i64, i64]
    handle.loft_projected_adam_scratch.restype = i64
    handle.loft_projected_adam.argtypes = (
        [i32, i64, i64, i64, i64]
        + [ptr, i64, i64, i64]
        + [ptr, ptr]
        + [ptr, i64, i64, i64]
        + [ptr, f32, f32, f32, f32, i32]
        + [ptr, ptr, i64, i64]
    )
    handle.loft_projected_adam.restype = i32
    handle.loft_update_moments_scratch.argtypes = [i64, i64]
    handle.loft_update_moments_scratch.restype = i64
    handle.loft_update_moments.argtypes = (
        [i32, i64, i64, i64] + [ptr, i64, i64, i64] + [ptr, ptr, f32, f32, i32] + [ptr, ptr, ptr]
        + [ptr, i64, i64, i64, f32, f32, f32, ptr, i64, i64]
    )
    handle.loft_update_moments.restype = i32
    handle.loft_gram_inverse.argtypes = (
        [i32, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, ctypes.c_double] + [ptr, ptr, ptr, ptr]
    )
    handle.loft_gram_inverse.restype = i64
    handle.loft_alternating_step.argtypes = [ctypes.POINTER(_Factor), ctypes.POINTER(_Factor), ctypes.POINTER(_Options)]
    handle.loft_alternating_step.restype = i32


class _Factor(ctypes.Structure):
    """``struct loft_factor`` of ``csrc/loft_cpu.c``: one side of the pairs for :func:`alternating_step`."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("x_layer", ctypes.c_int64), ("x_row", ctypes.c_int64), ("x_col", ctypes.c_int64),
        ("grad", ctypes.c_void_p), ("grad_layer", ctypes.c_int64), ("grad_row", ctypes.c_int64),
        ("grad_col", ctypes.c_int64),
        ("exp_avg", ctypes.c_void_p), ("second", ctypes.c_void_p), ("prev", ctypes.c_void_p),
        ("pinv_prev", ctypes.c_void_p), ("pinv_now", ctypes.c_void_p), ("pinv", ctypes.c_void_p),
        ("calibration", ctypes.c_void_p), ("gram", ctypes.c_void_p),
        ("rows", ctypes.c_int64), ("calibrate", ctypes.c_int32), ("changed", ctypes.c_int32),
    ]  # fmt: skip


class _Options(ctypes.Structure):
    """``struct loft_step_options`` of ``csrc/loft_cpu.c``."""

    _fields_ = [
        ("threads", ctypes.c_int32), ("layers", ctypes.c_int64), ("rank", ctypes.c_int64), ("full", ctypes.c_int32),
        ("beta1", ctypes.c_float), ("beta2", ctypes.c_float), ("limit", ctypes.c_double),
        ("move_b", ctypes.c_int32), ("decay", ctypes.c_float),
        ("first_scale", ctypes.c_float), ("projector_scale", ctypes.c_float), ("eps", ctypes.c_float),
        ("step_scale", ctypes.c_float), ("step_eps", ctypes.c_float), ("floored", ctypes.c_int32),
        ("moments_scratch", ctypes.c_void_p), ("adam_scratch", ctypes.c_void_p),
        ("accepted", ctypes.c_void_p), ("out", ctypes.c_void_p), ("out_row", ctypes.c_int64),
        ("out_col", ctypes.c_int64), ("step", ctypes.c_void_p), ("phase", ctypes.c_void_p),
        ("next_phase", ctypes.c_int64),
    ]  # fmt: skip


def _layer_pointers(tensors) -> ctypes.Array:
    """A C array of the data pointers of ``tensors`` (a sequence of tensors, or the layers of an (L, ...) one)."""
    pointers = [t.data_ptr() for t in tensors]
    return (ctypes.c_void_p * len(pointers))(*pointers)


def _strides(x: Tensor) -> tuple[int, int, int]:
    return tuple(x.stride())  # (layer, row, column), in elements


def _contiguous_checked(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("the native kernels write their state in place and need it contiguous")


def projected_adam_update(
    x: Tensor,
    exp_avg: Tensor,
    cross: Tensor,
    y: Tensor,
    y_gram_pinv: Tensor,
    *,
    decay: float,
    first_scale: float,
    projector_scale: float,
    eps: float,
    floored: bool,
    scratch: Tensor,
) -> Tensor:
    """Block 5 as :func:`loft_peft.optim.kernels.projected_adam_update`, with its constants already folded in.

    ``x`` (L, k, r) and ``y`` (L, l, r) may be strided views; ``exp_avg`` (L, k, r), ``cross`` (L, k, R) and
    ``y_gram_pinv`` (L, r, r) are contiguous; ``scratch`` is a 1-d float tensor of at least
    :func:`projected_adam_scratch_size` elements. Returns the new factors, (L, k, r).
    """
    lib = library()
    layers, rows, rank = x.shape
    length = y.shape[1]
    pinv = y_gram_pinv.contiguous()
    _contiguous_checked(exp_avg, cross)
    out = torch.empty(layers, rows, rank, dtype=x.dtype, device=x.device)
    failed = lib.loft_projected_adam(
        torch.get_num_threads(), layers, rows, length, rank,
        x.data_ptr(), *_strides(x),
        exp_avg.data_ptr(), cross.data_ptr(),
        y.data_ptr(), *_strides(y),
        pinv.data_ptr(), decay, first_scale, projector_scale, eps, int(floored),
        scratch.data_ptr(), _layer_pointers(out), rank, 1,
    )  # fmt: skip
    if failed:
        raise MemoryError("LoFT native kernel: out of memory for its per-thread buffers")
    return out


@functools.lru_cache(maxsize=256)
def projected_adam_scratch_size(layers: int, length: int, rank: int) -> int:
    return int(library().loft_projected_adam_scratch(layers, length, rank))


def update_moments_(
    grad: Tensor,
    other_gram_pinv: Tensor,
    calibration: Tensor | None,
    exp_avg: Tensor,
    second: Tensor,
    *,
    beta1: float,
    beta2: float,
    full: bool,
    scratch: Tensor,
    simple_step: dict | None = None,
) -> Tensor | None:
    """Blocks 2-4 for one side of L pairs, in place: the scaled gradient ``g (y^T y)^+``, the calibrated first
    moment and, with ``full``, the carried cross terms ``second`` (L, k, R), else Adam's elementwise second moment
    ``second`` (L, k, r) of the scaled gradient. ``calibration`` None is the identity. ``scratch``: at least
    :func:`update_moments_scratch_size` elements. With ``simple_step`` (LoFT-simple: ``x``, the factor (L, k, r),
    and ``decay``, ``scale``, ``eps``), returns ``decay x + scale m / (sqrt(v) + eps)`` from the new moments."""
    lib = library()
    layers, rows, rank = grad.shape
    pinv = other_gram_pinv.contiguous()
    calib = None if calibration is None else calibration.contiguous()
    _contiguous_checked(exp_avg, second)
    if simple_step is not None and not full:
        x, out = simple_step["x"], torch.empty(layers, rows, rank, dtype=grad.dtype, device=grad.device)
        step_args = (x.data_ptr(), *_strides(x), simple_step["decay"], simple_step["scale"], simple_step["eps"])
    else:
        out, step_args = None, (None, 0, 0, 0, 1.0, 0.0, 0.0)
    failed = lib.loft_update_moments(
        torch.get_num_threads(), layers, rows, rank,
        grad.data_ptr(), *_strides(grad),
        pinv.data_ptr(), None if calib is None else calib.data_ptr(), beta1, beta2, int(full),
        exp_avg.data_ptr(), second.data_ptr(), scratch.data_ptr(),
        *step_args, None if out is None else _layer_pointers(out), rank, 1,
    )  # fmt: skip
    if failed:
        raise MemoryError("LoFT native kernel: out of memory for its per-thread buffers")
    return out


@functools.lru_cache(maxsize=256)
def update_moments_scratch_size(layers: int, rank: int) -> int:
    return int(library().loft_update_moments_scratch(layers, rank))


def gram_inverse(
    y: Tensor, limit: float, prev: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """For (L, l, r) fp32 factors ``y`` (strided views allowed): the inverses of their Gram matrices ``y^T y``,
    summed and factorised (Cholesky) in double precision; the Gram matrices (fp32); the layers whose inverse is *not*
    accepted (the factorisation failed or ``||G||_F ||G^-1||_F > limit``), ``None`` when all are; and with ``prev``
    (L, l, r), the calibration matrices ``prev^T y G^-1`` (eq. 7) as :func:`calibration_matrices` computes them from
    the fp32 inverse. A rejected layer's inverse and calibration are left unset."""
    layers, length, rank = y.shape
    gram = torch.empty(layers, rank, rank, dtype=y.dtype)
    out = torch.empty_like(gram)
    calibration = None if prev is None else torch.empty_like(gram)
    accepted = torch.empty(layers, dtype=torch.int32)
    count = _gram_inverse(y, prev, None, limit, gram, out, calibration, accepted)
    return out, gram, (None if count == layers else (accepted == 0).nonzero().squeeze(1)), calibration


def alternating_step_scratch_size(layers: int, rows_u: int, rows_v: int, rank: int, full: bool) -> int:
    """Floats of :func:`alternating_step`'s scratch: the kernels' own, and the step's matrices and new factor."""
    return _step_layout(layers, rows_u, rows_v, rank, full)[-1]


@functools.lru_cache(maxsize=256)
def _step_layout(layers: int, rows_u: int, rows_v: int, rank: int, full: bool) -> tuple[int, int, int, int, int]:
    """Where :func:`alternating_step`'s scratch holds (in floats, each part 64-byte aligned) block 5's buffers (after
    the moments kernel's), each side's C and Gram matrices, the new factor and the acceptance flags; and its size."""

    def aligned(n: int) -> int:
        return -(-n // 16) * 16

    adam = aligned(update_moments_scratch_size(layers, rank))
    block5 = max(projected_adam_scratch_size(layers, rows_v, rank), projected_adam_scratch_size(layers, rows_u, rank))
    matrices = adam + (aligned(block5) if full else 0)
    out = matrices + aligned(4 * layers * rank * rank)
    flags = out + aligned(layers * max(rows_u, rows_v) * rank)
    return adam, matrices, out, flags, flags + layers


def alternating_step(
    u: dict,
    v: dict,
    *,
    full: bool,
    move_b: bool,
    beta1: float,
    beta2: float,
    limit: float,
    decay: float,
    constants: tuple[float, float, float] | tuple[float, float],
    floored: bool,
    scratch: Tensor,
    step: Tensor,
    phase: Tensor,
    next_phase: int,
    destination: list[Tensor] | None = None,
    destination_strides: tuple[int, int] = (0, 0),
) -> tuple[Tensor | None, Tensor, Tensor] | None:
    """One alternating LoFT-AdamW step of L pairs in one call: the comparison of each factor with its previous value,
    then what :func:`gram_inverse` (or :func:`calibration_matrices`), :func:`update_moments_` for both sides and, with
    ``full``, :func:`projected_adam_update` for the moving factor compute, in that order, with the same bits (without
    ``full``, LoFT-simple: the moving factor's step comes out of its moments' pass, as :func:`update_moments_` does).

    Each side is a dict with ``x`` (L, k, r) and ``grad`` (strided views allowed), the contiguous state ``exp_avg``,
    ``second`` (the cross terms, or LoFT-simple's ``exp_avg_sq``) and ``prev``, the Gram pseudo-inverses known already,
    ``pinv_prev`` (of ``prev``) and ``pinv_now`` (of ``x``), each (L, r, r) or ``None``, and ``calibrate`` (eq. 7,
    when ``x`` changed). ``limit`` is :func:`gram_inverse`'s acceptance bound; ``constants`` are
    :func:`projected_adam_update`'s ``(first_scale, projector_scale, eps)`` with ``full``, else
    :func:`update_moments_`'s ``(scale, eps)``. ``scratch``: a 1-d fp32 tensor of at least
    :func:`alternating_step_scratch_size` elements. The moving factor's new value goes to ``destination``, L fp32
    tensors whose (row, column) element of the factor is at ``destination_strides`` (the parameters themselves; each
    element of the old factor is read before it is written), or else into ``scratch``. Once the step is done, the
    step counts ``step`` (L, fp32) gain one and the phases ``phase`` (L, int64) become ``next_phase``.

    Returns that new value (L, k, r) when it is in ``scratch`` (``None`` with a ``destination``; copy it out before
    ``scratch`` is used again) and the pseudo-inverses of ``u["x"]`` and ``v["x"]`` (new tensors), or ``None`` when a
    computed inverse was not accepted or a factor changed in some layers only: then nothing has been written and the
    caller takes the separate calls.
    """
    layers, rows_u, rank = u["x"].shape
    rows_v = v["x"].shape[1]
    if not (step.dtype == torch.float32 and phase.dtype == torch.int64):
        raise ValueError("the native step takes fp32 step counts and int64 phases")
    if not (step.is_contiguous() and phase.is_contiguous()):
        raise ValueError("the native step writes its step counts and phases in place and needs them contiguous")
    square, moving = layers * rank * rank, u if move_b else v
    adam_at, step_at, out_at, accepted_at, _ = _step_layout(layers, rows_u, rows_v, rank, full)
    base = scratch.data_ptr()
    keep = []  # contiguous copies the call reads, alive until it returns
    factors, pinvs = [], []
    for index, s in enumerate((u, v)):
        x, grad = s["x"], s["grad"]
        _contiguous_checked(s["exp_avg"], s["second"], s["prev"])
        known = []
        for t in (s["pinv_prev"], s["pinv_now"]):
            if t is not None and not t.is_contiguous():
                t = t.contiguous()
                keep.append(t)
            known.append(None if t is None else t.data_ptr())
        pinv = torch.empty(layers, rank, rank, dtype=torch.float32)  # the caller keeps it
        pinvs.append(pinv)
        matrices_at = base + 4 * (step_at + 2 * index * square)
        factors.append(_Factor(
            x.data_ptr(), *x.stride(), grad.data_ptr(), *grad.stride(),
            s["exp_avg"].data_ptr(), s["second"].data_ptr(), s["prev"].data_ptr(), *known, pinv.data_ptr(),
            matrices_at, matrices_at + 4 * square, x.shape[1], int(s["calibrate"]), 0,
        ))  # fmt: skip
    out = None
    if destination is None:
        out = scratch[out_at : out_at + moving["x"].numel()].view(moving["x"].shape)
        destination, destination_strides = out, (rank, 1)
    pointers = _layer_pointers(destination)
    block5, simple = (constants, (0.0, 0.0)) if full else ((1.0, 0.0, 0.0), constants)
    options = _Options(
        torch.get_num_threads(), layers, rank, int(full), beta1, beta2, limit, int(move_b), decay,
        *block5, *simple, int(floored),
        base, base + 4 * adam_at, base + 4 * accepted_at, ctypes.cast(pointers, ctypes.c_void_p), *destination_strides,
        step.data_ptr(), phase.data_ptr(), next_phase,
    )  # fmt: skip
    result = library().loft_alternating_step(ctypes.byref(factors[0]), ctypes.byref(factors[1]), ctypes.byref(options))
    if result in (2, 3):
        return None
    if result != 0:
        raise MemoryError("LoFT native kernel: out of memory for its per-thread buffers")
    return out, pinvs[0], pinvs[1]


def calibration_matrices(prev: Tensor, y: Tensor, y_gram_pinv: Tensor) -> Tensor:
    """Eq. (7)'s ``prev^T y (y^T y)^+`` for (L, l, r) fp32 factors (``y`` strided views allowed), the products summed
    in double precision, (L, r, r)."""
    out = torch.empty(y.shape[0], y.shape[-1], y.shape[-1], dtype=y.dtype)
    accepted = torch.empty(y.shape[0], dtype=torch.int32)
    _gram_inverse(y, prev, y_gram_pinv.contiguous(), 0.0, None, None, out, accepted)
    return out


def _gram_inverse(
    y: Tensor,
    prev: Tensor | None,
    given: Tensor | None,
    limit: float,
    gram: Tensor | None,
    out: Tensor | None,
    calibration: Tensor | None,
    accepted: Tensor,
) -> int:
    """loft_gram_inverse on the tensors (``None`` for a NULL pointer); returns how many inverses were accepted."""
    prev = None if prev is None else prev.contiguous()
    layers, length, rank = y.shape
    count = library().loft_gram_inverse(
        torch.get_num_threads(), layers, length, rank, y.data_ptr(), *_strides(y),
        *(None if t is None else t.data_ptr() for t in (prev, given)), limit,
        *(None if t is None else t.data_ptr() for t in (gram, out, calibration, accepted)),
    )  # fmt: skip
    if count < 0 or (given is not None and count != layers):
        raise MemoryError("LoFT native kernel: out of memory for the Gram matrices")
    return count
