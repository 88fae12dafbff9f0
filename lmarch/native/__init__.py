"""lmarch's own CPU kernels, and the one step that puts them to work: :func:`accelerate`.

``lmarch.native.accelerate(model, training=...)`` swaps, in place, each block of ``model`` that
a native module reproduces exactly for that module (same parameters, same state-dict keys):

- a GPT-2 block -> :class:`~lmarch.native.gpt_block.NativeGPTBlock` (``gpt_block.c``, one call
  forward and one backward),
- causal self-attention -> :class:`~lmarch.native.attention.NativeCausalAttention`
  (``attention.c``),
- GPT-2's tanh GELU -> :func:`~lmarch.native.activations.fast_gelu_tanh` (``activations.c``),
- for inference, a SwiGLU MLP over Q4_1 layers -> :class:`~lmarch.native.swiglu.NativeSwiGLU`
  (``blockq.c``) and a block-quantised LLaMA layer ->
  :class:`~lmarch.native.decoder.NativeDecoderBlock` (``decoder.c``, one call per token).

Which modules are swapped and which calls then take a kernel is decided in one place,
:mod:`lmarch.native.policy`; a call the kernel does not take runs the reference module's own
forward. The library's interface is declared once, in ``lmarch.h``; :mod:`lmarch.native.abi`
reads it to declare the functions to ctypes and checks the structs' sizes at load.

The C files are small and have no dependency but libc (and OpenMP, shared with torch), so they
compile in a few seconds on first use. The shared library ``lmarch-<hash>.so`` is cached under
``$LMARCH_CACHE_DIR`` (default ``~/.cache/lmarch``) by a hash of the sources, the compiler and
the flags. Without a compiler, or with ``LMARCH_NATIVE=0``, :func:`native_library` returns None,
:func:`accelerate` changes nothing and the block-quantised layers dequantise in PyTorch
(correct, slower).

The matrix products are also registered as PyTorch operators (``torch.ops.lmarch.*``) so that
``torch.compile`` keeps them as single opaque calls inside a compiled decode step.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from lmarch.native import abi

HERE = Path(__file__).parent
SOURCES = tuple(
    HERE / name
    for name in (
        "abi.c",
        "blockq.c",
        "kquant.c",
        "decoder.c",
        "activations.c",
        "attention.c",
        "rows.c",
        "gpt_block.c",
    )
)
HEADERS = (HERE / "lmarch.h", HERE / "kernels.h")
QK = abi.DEFINES["LMARCH_QK"]  # inputs per block, as in llama.cpp's formats


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LMARCH_CACHE_DIR`` or ``~/.cache/lmarch``."""
    root = os.environ.get("LMARCH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmarch"
    )
    return Path(root) / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def simd_flags() -> list[str]:
    """Compiler flags for the vector path when this CPU has AVX2, FMA and F16C (x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    have = _cpu_flags()
    return ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= have else []


def build(extra_flags: list[str] | None = None, out_dir: Path | None = None) -> Path:
    """Compile the C sources into one shared library (cached) and return its path.

    ``extra_flags`` defaults to :func:`simd_flags`; pass ``[]`` for the portable C path.
    Raises ``RuntimeError`` with the compiler's message when compiling fails.
    """
    flags = simd_flags() if extra_flags is None else list(extra_flags)
    compiler = os.environ.get("CC", "cc")
    sources = [path.read_bytes() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256(b"\0".join([*sources, compiler.encode(), *map(str.encode, flags)]))
    out_dir = out_dir or cache_dir()
    target = out_dir / f"lmarch-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    base = [compiler, "-O3", "-fno-math-errno", "-shared", "-fPIC", *flags, *map(str, SOURCES)]
    errors = []
    # OpenMP splits rows across threads; a compiler without it still gives a working library
    for omp in (["-fopenmp"], []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            run = subprocess.run([*base, *omp, "-o", tmp, "-lm"], capture_output=True, text=True)
        except OSError as exc:  # no compiler at all
            os.unlink(tmp)
            raise RuntimeError(f"cannot run the C compiler {compiler!r}: {exc}") from exc
        if run.returncode == 0:
            os.replace(tmp, target)  # atomic: a concurrent build never sees half a file
            return target
        os.unlink(tmp)
        errors.append(run.stderr.strip().splitlines()[-1:] or ["(no message)"])
    raise RuntimeError(f"compiling lmarch's kernels failed: {errors[-1][0]}")


def load(path: Path) -> ctypes.CDLL:
    """Load a library built by :func:`build`: declare its functions from ``lmarch.h``, check its
    structs' sizes against Python's (``RuntimeError`` on a mismatch) and hand it PyTorch's sgemm."""
    lib = abi.declare(ctypes.CDLL(str(path)))
    abi.check_struct_sizes(lib)
    sgemm = torch_sgemm()
    if sgemm is not None:
        lib.lmarch_set_sgemm(sgemm)
        if not lib.lmarch_sgemm_check():
            lib.lmarch_set_sgemm(None)
    return lib


def torch_sgemm() -> int | None:
    """The address of the Fortran ``sgemm_`` of the BLAS PyTorch was built with (MKL in the
    x86 wheels, 32-bit sizes), or None where it cannot be found: lmarch's fused GPT-2 block
    calls it from its own threads (``gpt_block.c``)."""
    if not torch.backends.mkl.is_available():
        return None
    for path in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu.*")):
        try:
            return ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


@cache
def blas_ready() -> bool:
    """True when the native library has PyTorch's sgemm to call (and it passed a check)."""
    lib = native_library()
    return lib is not None and bool(lib.lmarch_sgemm_check())


@cache
def native_library() -> ctypes.CDLL | None:
    """The block-quantisation kernels for this machine, built once; None when unavailable
    (``LMARCH_NATIVE=0``, not Linux/macOS, or no working C compiler — a warning says why)."""
    if os.environ.get("LMARCH_NATIVE", "1") == "0" or sys.platform not in ("linux", "darwin"):
        return None
    try:
        return load(build())
    except (RuntimeError, OSError) as exc:
        warnings.warn(f"lmarch native kernels unavailable, using PyTorch: {exc}", stacklevel=2)
        return None


def native_available() -> bool:
    """True when :func:`native_library` could be built and loaded. Asked when swapping modules
    in and building layers, never inside a forward, so compiled graphs do not see it (and
    importing lmarch does not import ``torch._dynamo``, ~1.4 s)."""
    return native_library() is not None


def accelerate(model: nn.Module, *, training: bool) -> nn.Module:
    """Swap lmarch's native fast paths into ``model``, in place, and return it (see the module
    docstring); ``training=False`` adds the inference-only ones (block-quantised SwiGLU and
    decoder layers). The identity without the native library (``LMARCH_NATIVE=0``, no C
    compiler)."""
    from lmarch.native.swaps import accelerate as swap_in

    return swap_in(model, training=training)


def block_matmul(function: str, x: Tensor, codes: Tensor, constants: Tensor, lib=None) -> Tensor:  # type: ignore[no-untyped-def]
    """y [M, N] = x W^T by ``lib.<function>`` (``lmarch_q4_1_matmul`` / ``lmarch_q8_0_matmul``)
    for x float [M, K] and the weight's ``codes`` and block ``constants``; ``lib`` defaults to
    :func:`native_library` (tests pass a library built with other flags)."""
    lib = lib or native_library()
    if lib is None:
        raise RuntimeError("lmarch native kernels are not available")
    if x.dtype != torch.float32:
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    m, k = x.shape
    n = codes.shape[0]
    y = torch.empty(m, n)
    if m == 0:
        return y
    status = getattr(lib, function)(
        x.data_ptr(), m, k, codes.data_ptr(), constants.data_ptr(), n, y.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError(f"{function}: no memory for the quantised activations [{m}, {k}]")
    return y


def q4_1_matmul_eager(x: Tensor, codes: Tensor, dm_bits: Tensor) -> Tensor:
    """y [M, N] = x W^T, W in Q4_1 blocks (see ``blockq.c``); x float [M, K] on the CPU."""
    return block_matmul("lmarch_q4_1_matmul", x, codes, dm_bits)


def q8_0_matmul_eager(x: Tensor, codes: Tensor, d_bits: Tensor) -> Tensor:
    """y [M, N] = x W^T, W in Q8_0 blocks (see ``blockq.c``); x float [M, K] on the CPU."""
    return block_matmul("lmarch_q8_0_matmul", x, codes, d_bits)


def q4_1_swiglu_eager(
    x: Tensor, gu_codes: Tensor, gu_dm: Tensor, down_codes: Tensor, down_dm: Tensor, lib=None
) -> Tensor:  # type: ignore[no-untyped-def]
    """y [M, K] = W_down (SiLU(W_gate x) * (W_up x)) in one native call; ``gu_*`` hold the fused
    [2H, K] gate/up matrix (gate rows first), ``down_*`` the [K, H] down matrix, all Q4_1."""
    lib = lib or native_library()
    if lib is None:
        raise RuntimeError("lmarch native kernels are not available")
    if x.dtype != torch.float32:
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, k)
    if m == 0:
        return y
    status = lib.lmarch_q4_1_swiglu(
        x.data_ptr(), m, k, gu_codes.data_ptr(), gu_dm.data_ptr(), gu_codes.shape[0] // 2,
        down_codes.data_ptr(), down_dm.data_ptr(), y.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError(f"lmarch_q4_1_swiglu: no memory for activations [{m}, {k}]")
    return y


def gelu_tanh_forward(x: Tensor, lib=None) -> Tensor:  # type: ignore[no-untyped-def]
    """GELU(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) for float32 x on the CPU
    (``activations.c``)."""
    lib = lib or native_library()
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.lmarch_gelu_tanh_forward(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
    return y


def gelu_tanh_backward(x: Tensor, grad: Tensor, lib=None) -> Tensor:  # type: ignore[no-untyped-def]
    """grad * GELU'(x) for float32 tensors of one shape on the CPU (``activations.c``)."""
    lib = lib or native_library()
    x, grad = x.contiguous(), grad.contiguous()
    dx = torch.empty_like(x)
    lib.lmarch_gelu_tanh_backward(
        x.data_ptr(), grad.data_ptr(), dx.data_ptr(), x.numel(), torch.get_num_threads()
    )
    return dx


# The same products as PyTorch operators, so torch.compile treats each as one opaque call.
# (The low-level registration costs ~10 us a call; ``torch.library.custom_op`` ~40 us, which
# over SmolLM2's 121 products a token would be a tenth of the whole step.)
_LIBRARY = torch.library.Library("lmarch", "DEF")
for _name, _fn in (("q4_1_matmul", q4_1_matmul_eager), ("q8_0_matmul", q8_0_matmul_eager)):
    _LIBRARY.define(f"{_name}(Tensor x, Tensor codes, Tensor constants) -> Tensor")
    _LIBRARY.impl(_name, _fn, "CPU")

    @torch.library.register_fake(f"lmarch::{_name}")
    def _fake(x: Tensor, codes: Tensor, constants: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


_LIBRARY.define(
    "q4_1_swiglu(Tensor x, Tensor gu_codes, Tensor gu_dm, Tensor down_codes, Tensor down_dm)"
    " -> Tensor"
)
_LIBRARY.impl("q4_1_swiglu", q4_1_swiglu_eager, "CPU")


@torch.library.register_fake("lmarch::q4_1_swiglu")
def _fake_swiglu(x: Tensor, gu_codes: Tensor, gu_dm: Tensor, dc: Tensor, dd: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], dtype=torch.float32)


q4_1_matmul = torch.ops.lmarch.q4_1_matmul.default
q4_1_swiglu = torch.ops.lmarch.q4_1_swiglu.default
q8_0_matmul = torch.ops.lmarch.q8_0_matmul.default


__all__ = [
    "QK",
    "accelerate",
    "blas_ready",
    "block_matmul",
    "build",
    "cache_dir",
    "gelu_tanh_backward",
    "gelu_tanh_forward",
    "load",
    "native_available",
    "native_library",
    "q4_1_matmul",
    "q4_1_matmul_eager",
    "q8_0_matmul",
    "q4_1_swiglu",
    "q4_1_swiglu_eager",
    "q8_0_matmul_eager",
    "simd_flags",
    "torch_sgemm",
]
