"""Native int8 / int4 CPU kernels for decoding, compiled on first use and called through ctypes.

Why not only PyTorch's ops: `aten._weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` are compute-bound
at batch 1 on AVX2 CPUs (measured here: 4–10 GB/s of int8 weights, about the speed of fp32 F.linear per
row), which left quantized decoding at less than half of llama.cpp's. A decode step is a matrix-vector
product per layer, bound by how fast the weights stream from memory, so `native.cpp`:
- rounds the activations to int16 per block of ≤ 256 columns (xq = round(x/sx), sx = max|x_block|/32767;
  |Δx| ≤ sx/2, i.e. 2⁻¹⁶ of the block's largest value: 1/1000 of int4's and 1/100 of int8's own weight
  rounding; llama.cpp rounds activations to int8 instead), so that one vpmaddwd does 16 exact integer
  multiply-adds and only block sums are scaled in fp32;
- reads the canonical tensors of `QuantLinear` (int8 [N, K], int4 nibbles [N, K/2], row-major) in place,
  8 rows at a time, transposing 8 bytes of each row in registers so that 8 outputs accumulate in one
  vector; one pass over the weights serves up to 8 activation rows. There is no kernel-private weight
  layout: the weights exist once, in the form that is saved, dequantized and merged.
Larger batches (prefill) dequantize row chunks with the reference's exact arithmetic and use the BLAS GEMM
(`QuantLinear` decides). `ty_decode` runs a whole decode step for `tianying.quantize.decode`.

Building: the system C++ compiler (`$CXX`, g++, c++ or clang++) with -O3 -fopenmp, plus -mavx2 -mfma -mf16c
when torch reports an AVX2/AVX512 CPU. The library is cached under `$TIANYING_CACHE` (default
~/.cache/tianying) by a hash of the source, flags and compiler, written atomically; it links the libgomp
that torch already loaded, so there is one OpenMP thread pool. No compiler (or a failed build) → a warning
once, and `available()` is False: `QuantLinear` then uses PyTorch's ops or the reference path.
`TIANYING_QUANT_BACKEND=aten|reference` skips the native kernels; `TIANYING_NATIVE_SIMD=0` builds the
portable scalar code even on an AVX2 CPU (what a CPU without AVX2 runs; CI tests both).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.cpp")
_LIB: ctypes.CDLL | None = None
_TRIED = False
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _flags(simd: bool = True) -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
    cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    if simd and os.environ.get("TIANYING_NATIVE_SIMD", "1") == "0":
        simd = False
    if simd and (cap.startswith("AVX2") or cap.startswith("AVX512")):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def cache_dir() -> Path:
    return Path(os.environ.get("TIANYING_CACHE") or Path.home() / ".cache" / "tianying") / "kernels"


def build(simd: bool = True, directory: Path | None = None) -> Path:
    """Compile native.cpp (or reuse the cached build); returns the shared library's path.

    `simd=False` builds the portable scalar path (tests compare both against the reference)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    flags = _flags(simd)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
    out = Path(directory or cache_dir()) / f"tianying_quant_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode:
            raise RuntimeError(f"{Path(cxx).name} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: a concurrent process sees the old state or the whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def bind(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its C signatures."""
    lib = ctypes.CDLL(str(path))
    lib.ty_gemm_i8.argtypes = [_P, _L, _L, _L, _P, _L, _P, _P, _P, _L, _I]
    lib.ty_gemm_i4.argtypes = [_P, _L, _L, _L, _P, _L, _P, _P, _L, _P, _L, _I]
    lib.ty_dequant_i8.argtypes = [_P, _P, _P, _L, _L, _L, _P, _I]
    lib.ty_dequant_i4.argtypes = [_P, _P, _P, _L, _L, _L, _L, _L, _P, _I]
    lib.ty_decode.argtypes = [_P, _L, _L, _L, _L, _L, _L, ctypes.c_float, _P, _L, _P, _P, _P, _P, _L, _L, _P, _I]
    for f in (lib.ty_gemm_i8, lib.ty_gemm_i4, lib.ty_dequant_i8, lib.ty_dequant_i4, lib.ty_decode):
        f.restype = None
    return lib


def _load() -> ctypes.CDLL | None:
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    try:
        _LIB = bind(build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"native int8/int4 kernels unavailable ({e}); quantized layers use PyTorch's ops", stacklevel=3)
    return _LIB


def available() -> bool:
    """Whether the kernels are built and loaded here (whether they are used: `QuantLinear.path_for`)."""
    return _load() is not None


class Proj(ctypes.Structure):
    """native.cpp's `Proj`: one projection's kernel operands."""

    _fields_ = [("w", _P), ("s", _P), ("o", _P), ("z", _P), ("N", _L), ("N8", _L), ("K", _L), ("kb", _L), ("G", _L),
                ("int8", _I), ("perm", _P)]


class Layer(ctypes.Structure):
    """native.cpp's `Layer`: one block's norms and projections for `ty_decode`."""

    _fields_ = [("ln1", _P), ("ln2", _P), ("qkv", Proj), ("o", Proj), ("gu", Proj), ("down", Proj)]


# ------------------------------------------------------------------------------------------ operands
def _rows_x8(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """[N, C] → [ceil(N/8), C, 8]: 8 consecutive rows interleaved (rows padded with `fill`)."""
    N, C = t.shape
    t = torch.nn.functional.pad(t, (0, 0, 0, -N % 8), value=fill)
    return t.reshape(-1, 8, C).transpose(1, 2).contiguous()


STEP = 16  # columns a kernel step takes (int8: 16 bytes; int4: 8 or 16 bytes)


def act_block(k: int, group: int) -> int:
    """Activation block for int16 rounding: the largest multiple of 16 ≤ 256 dividing the group (or K)."""
    g, st = (group if group > 0 else k), STEP
    for kb in range(min(g, 256) // st * st, st - 1, -st):
        if g % kb == 0:
            return kb
    raise ValueError(f"no activation block for group {g}")


def supports(k: int, group: int) -> bool:
    g = group if group > 0 else k
    return k % STEP == 0 and g % STEP == 0


def operands(scales: torch.Tensor, zeros: torch.Tensor, int8: bool, k: int) -> tuple:
    """Kernel operands derived from a QuantLinear's scales fp16 [G, N] and zeros int16 [G, N] (padded to N8).

    int8 (G = 1): (kb, s fp32, o = 128 − z fp32 or None when symmetric); int4: (kb, s, z) in [N8/8, G, 8].
    """
    pad = -scales.shape[1] % 8
    G = scales.shape[0]
    kb = act_block(k, k // G)
    if int8:
        s = torch.nn.functional.pad(scales[0].float(), (0, pad))
        z = torch.nn.functional.pad(zeros[0].float(), (0, pad), value=128.0)
        return kb, s, None if bool((z == 128).all()) else (128.0 - z).contiguous()
    return kb, _rows_x8(scales.t().contiguous()), _rows_x8(zeros.t().to(torch.uint8))


# ------------------------------------------------------------------------------------------ calls
def _threads() -> int:
    return torch.get_num_threads()


def gemm_i8(x: torch.Tensor, w: torch.Tensor, kb: int, s: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
    """x fp32 [M, K] contiguous, w canonical int8 [N, K], s/o fp32 [N8] → y fp32 [M, N8] (N8: N rounded up to 8)."""
    M, K = x.shape
    N = w.shape[0]
    N8 = s.shape[0]
    y = torch.empty(M, N8, dtype=torch.float32)
    _LIB.ty_gemm_i8(x.data_ptr(), M, K, kb, w.data_ptr(), N, s.data_ptr(), None if o is None else o.data_ptr(),
                    y.data_ptr(), N8, _threads())
    return y


def gemm_i4(x: torch.Tensor, w: torch.Tensor, kb: int, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x fp32 [M, K], w canonical nibbles uint8 [N, K/2], s fp16 / z uint8 [N8/8, G, 8] → y fp32 [M, N8]."""
    M, K = x.shape
    N, N8, G = w.shape[0], s.shape[0] * 8, s.shape[1]
    y = torch.empty(M, N8, dtype=torch.float32)
    _LIB.ty_gemm_i4(x.data_ptr(), M, K, kb, w.data_ptr(), N, s.data_ptr(), z.data_ptr(), G, y.data_ptr(), N8,
                    _threads())
    return y


def _out(n0: int, n1: int, K: int, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(n1 - n0, K, dtype=torch.float32) if out is None or out.shape[0] < n1 - n0 else out[:n1 - n0]


def dequant_i8(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, n0: int, n1: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [n0, n1) of Ŵ = (q − z)·s as fp32 [n1 − n0, K] from the canonical tensors (w int8 [N, K], scales
    fp16 [1, N], zeros int16 [1, N], all contiguous), bit-equal to the reference dequantization."""
    K = w.shape[1]
    buf = _out(n0, n1, K, out)
    _LIB.ty_dequant_i8(w.data_ptr(), scales.data_ptr(), zeros.data_ptr(), K, n0, n1, buf.data_ptr(), _threads())
    return buf


def dequant_i4(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, n0: int, n1: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """As `dequant_i8` for int4: w nibbles [N, K/2], scales fp16 / zeros int16 [G, N]."""
    N, K, G = w.shape[0], w.shape[1] * 2, scales.shape[0]
    buf = _out(n0, n1, K, out)
    _LIB.ty_dequant_i4(w.data_ptr(), scales.data_ptr(), zeros.data_ptr(), N, G, K, n0, n1, buf.data_ptr(),
                       _threads())
    return buf
