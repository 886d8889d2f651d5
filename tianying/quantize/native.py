"""Native int8 / int4 CPU kernels for decoding, compiled on first use and called through ctypes.

Why not only PyTorch's ops: `aten._weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` are compute-bound
at batch 1 on AVX2 CPUs (measured here: 4–10 GB/s of int8 weights, the speed of fp32 F.linear per row),
which leaves quantized decoding at about half of llama.cpp's. A decode step is a matrix-vector product per
layer, bound by how fast the weights stream from memory, so `native.cpp` keeps fp32 activations, converts
8 weights per instruction and accumulates with FMA, one pass over the weights for up to 16 activation rows.
Larger batches (prefill) dequantize row chunks and use the BLAS GEMM (`QuantLinear` decides).

Building: the system C++ compiler (`$CXX`, g++, c++ or clang++) with -O3 -fopenmp, plus -mavx2 -mfma -mf16c
when torch reports an AVX2/AVX512 CPU. The library is cached under `$TIANYING_CACHE` (default
~/.cache/tianying) by a hash of the source, flags and compiler, written atomically; it links the libgomp
that torch already loaded, so there is one OpenMP thread pool. No compiler (or a failed build) → a warning
once, and `available()` is False: `QuantLinear` then uses PyTorch's ops or the reference path.
`TIANYING_QUANT_BACKEND=aten|reference` skips the native kernels.
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
    lib.ty_gemm_i8.argtypes = [_P, _L, _L, _P, _P, _P, _P, _L, _I]
    lib.ty_gemm_i4.argtypes = [_P, _L, _L, _P, _P, _P, _L, _P, _P, _L, _I]
    lib.ty_dequant_i8.argtypes = [_P, _P, _P, _L, _L, _L, _P, _I]
    lib.ty_dequant_i4.argtypes = [_P, _P, _P, _L, _L, _L, _L, _P, _I]
    for f in (lib.ty_gemm_i8, lib.ty_gemm_i4, lib.ty_dequant_i8, lib.ty_dequant_i4):
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
    if os.environ.get("TIANYING_QUANT_BACKEND", "auto").lower() in ("aten", "reference"):
        return False
    return _load() is not None


def simd() -> str:
    """"avx2" or "scalar": which path the loaded library was compiled with."""
    lib = _load()
    return "none" if lib is None else ("avx2" if lib.ty_simd() == 2 else "scalar")


# ------------------------------------------------------------------------------------------ layout
def _rows_x8(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """[N, C] → [ceil(N/8), C, 8]: 8 consecutive rows interleaved (rows padded with `fill`)."""
    N, C = t.shape
    t = torch.nn.functional.pad(t, (0, 0, 0, -N % 8), value=fill)
    return t.reshape(-1, 8, C).transpose(1, 2).contiguous()


def _unrows_x8(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


def to_x8_i8(w: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] (q − 128) → native.cpp's int8 x8 layout [ceil(N/8), K, 8]."""
    return _rows_x8(w)


def from_x8_i8(p: torch.Tensor, n: int) -> torch.Tensor:
    return _unrows_x8(p, n)


def to_x8_i4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] (values < 16) → int4 x8 layout [ceil(N/8), K/2, 8]: column 2j low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return _rows_x8(q[:, 0::2] | (q[:, 1::2] << 4))


def from_x8_i4(p: torch.Tensor, n: int) -> torch.Tensor:
    b = _unrows_x8(p, n)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(n, -1)


def operands(scales: torch.Tensor, zeros: torch.Tensor, int8: bool) -> tuple:
    """Kernel operands from a QuantLinear's scales fp16 [G, N] and zeros int16 [G, N] (padded to N % 8 == 0).

    int8 (G = 1): (s fp32, o = 128 − z fp32 or None when symmetric, z fp32); int4: (s, z) in [N/8, G, 8].
    """
    pad = -scales.shape[1] % 8
    if int8:
        s = torch.nn.functional.pad(scales[0].float(), (0, pad))
        z = torch.nn.functional.pad(zeros[0].float(), (0, pad), value=128.0)
        return s, None if bool((z == 128).all()) else (128.0 - z).contiguous(), z
    return _rows_x8(scales.t().contiguous()), _rows_x8(zeros.t().to(torch.uint8))


# ------------------------------------------------------------------------------------------ calls
def _threads() -> int:
    return torch.get_num_threads()


def gemm_i8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, z: torch.Tensor | None = None
            ) -> torch.Tensor:
    """x fp32 [M, K] contiguous, w int8 x8 layout, s/o fp32 [N8] → y fp32 [M, N8] (N8: N rounded up to 8)."""
    M, K = x.shape
    N = w.shape[0] * 8
    y = torch.empty(M, N, dtype=torch.float32)
    _LIB.ty_gemm_i8(x.data_ptr(), M, K, w.data_ptr(), s.data_ptr(), None if o is None else o.data_ptr(),
                    y.data_ptr(), N, _threads())
    return y


def gemm_i4(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """x fp32 [M, K], w int4 x8 layout, s fp16 / z uint8 [N8/8, G, 8] → y fp32 [M, N8]."""
    M, K = x.shape
    N, G = w.shape[0] * 8, s.shape[1]
    y = torch.empty(M, N, dtype=torch.float32)
    xs = torch.empty(16 * G, dtype=torch.float32)
    _LIB.ty_gemm_i4(x.data_ptr(), M, K, w.data_ptr(), s.data_ptr(), z.data_ptr(), G, xs.data_ptr(), y.data_ptr(),
                    N, _threads())
    return y


def _dequant_rows(n0: int, n1: int, K: int, out: torch.Tensor | None) -> tuple[int, int, torch.Tensor]:
    """Kernel rows are whole 8-row blocks: [n0 rounded down, n1 rounded up) into `out`."""
    a, b = n0 // 8 * 8, -(-n1 // 8) * 8
    buf = torch.empty(b - a, K, dtype=torch.float32) if out is None or out.shape[0] < b - a else out[:b - a]
    return a, b, buf


def dequant_i8(w: torch.Tensor, ops: tuple, n0: int, n1: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [n0, n1) of Ŵ = (q − z)·s as fp32 [n1 − n0, K], bit-equal to the reference dequantization."""
    K = w.shape[1]
    a, b, buf = _dequant_rows(n0, n1, K, out)
    _LIB.ty_dequant_i8(w.data_ptr(), ops[0].data_ptr(), ops[2].data_ptr(), K, a, b, buf.data_ptr(), _threads())
    return buf[n0 - a:n1 - a]


def dequant_i4(w: torch.Tensor, ops: tuple, n0: int, n1: int, out: torch.Tensor | None = None) -> torch.Tensor:
    K, G = w.shape[1] * 2, ops[0].shape[1]
    a, b, buf = _dequant_rows(n0, n1, K, out)
    _LIB.ty_dequant_i4(w.data_ptr(), ops[0].data_ptr(), ops[1].data_ptr(), G, K, a, b, buf.data_ptr(), _threads())
    return buf[n0 - a:n1 - a]
