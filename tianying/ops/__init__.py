"""Native CPU operations the model calls for decoding, compiled on first use and called through ctypes.

Why not only PyTorch's ops: a decode step is a matrix-vector product per projection, bound by how fast the
weights stream from memory, and at batch 1 PyTorch reaches less than half of that bound (measured here:
dense fp32/bf16 F.linear ~18 GB/s, `aten._weight_int8pack_mm` 4–10 GB/s, against ~44 GB/s read bandwidth),
while ~1,000 small ops per step (norms, RoPE, cache writes, attention over a short cache) cost as much
again in dispatch. So `cpu.cpp` provides the few operations a decode step is made of, and the model
(tianying.model) calls them in its own layer loop — there is no second forward pass in C++:
- `linear(x, weights, norm=, swiglu=, add=)`: y = pre(x) · [W0; W1; W2]ᵀ (+ residual) for up to three
  weights reading the same input (q/k/v, gate/up) in one parallel region; pre is the RMSNorm or the SwiGLU
  in front of the projection. Weights are dense fp32 / bf16 / fp16 `nn.Linear` weights, read in place
  (bf16/fp16 widened to fp32 exactly, fp32 accumulation), or `QuantLinear`'s canonical int8 / int4 tensors
  read in place: the activations are rounded to int16 per block of ≤ 256 columns (xq = round(x/sx),
  sx = max|x_block|/32767; |Δx| ≤ sx/2, i.e. 2⁻¹⁶ of the block's largest value: 1/1000 of int4's and 1/100
  of int8's own weight rounding), so one vpmaddwd does 16 exact integer multiply-adds and only block sums
  are scaled in fp32. One pass over the weights serves up to 8 activation rows.
- `attend_decode(qkv, …, o=, add=)`: one new token per row — RoPE, the key/value written at the row's own
  length in its KV-cache row (fp32 or bf16), softmax(qKᵀ/√d)V over that row, and optionally the output
  projection and the residual.
- `mlp(x, gate, up, down, norm, eps, add)`: a block's MLP, RMSNorm to residual, in one parallel region.
Every call takes tensors and reads their addresses for that call only; an `ops.Graph` records calls and
replays them in one C call (`ty_run`), keeping what it recorded alive, and its owner (tianying.model's
`DecodeGraph`) drops it when the model changes: no address is used after its tensor changed. Larger batches
(prefill) dequantize row chunks with the reference's exact arithmetic and multiply them on `linear` or the
BLAS GEMM (`QuantLinear` decides, with `dense_gemm`); dense prefill projections take `linear` where
`dense_gemm` says it is faster than PyTorch's GEMM (tianying.model.project), PyTorch's otherwise.

Building: the system C++ compiler (`$CXX`, g++, c++ or clang++) with -O3 -fopenmp, plus -mavx2 -mfma -mf16c
when torch reports an AVX2/AVX512 CPU, -mavx512f -mavx512bw where it reports AVX512 and the CPU has them (16-lane
dense GEMV, int4 steps of 64 columns), and the VNNI instruction (the same integer sums in one instruction
instead of two) where torch reports AVX512 and the CPU has avx512_vnni, or it has avx_vnni. The library is
cached under `$TIANYING_CACHE` (default ~/.cache/tianying) by a hash of the source, flags and compiler,
written atomically; it links the libgomp that torch already loaded, so there is one OpenMP thread pool.
No compiler (or a failed build) → a warning once, and `available()` is False: the model and `QuantLinear`
then use PyTorch's ops.
`TIANYING_QUANT_BACKEND=aten|reference` skips the native quantized kernels; `TIANYING_NATIVE_SIMD=0` builds
the portable scalar code even on an AVX2 CPU (what a CPU without AVX2 runs; CI tests both);
`TIANYING_NATIVE_OPS=0` makes the model use PyTorch's ops for decoding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.cpp")
_LIB: ctypes.CDLL | None = None
_TRIED = False
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def cpu_capability() -> str:
    """The instruction set torch dispatches to here ("AVX512", "AVX2", "DEFAULT"; `ATEN_CPU_CAPABILITY` lowers it)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch < 2.1
        return "unknown"


def _flags(simd: bool = True) -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]
    cap = cpu_capability()
    if simd and os.environ.get("TIANYING_NATIVE_SIMD", "1") == "0":
        simd = False
    if simd and (cap.startswith("AVX2") or cap.startswith("AVX512")):
        flags += ["-mavx2", "-mfma", "-mf16c"]
        cpu = _cpu_flags()
        if cap.startswith("AVX512") and {"avx512f", "avx512bw"} <= cpu:
            flags += ["-mavx512f", "-mavx512bw"]  # int4 steps of 64 columns
        if cap.startswith("AVX512") and {"avx512_vnni", "avx512vl"} <= cpu:
            flags += ["-mavx512vnni", "-mavx512vl"]  # one instruction per int16 multiply-add step
        elif "avx_vnni" in cpu:
            flags += ["-mavxvnni"]
    return flags


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    return Path(os.environ.get("TIANYING_CACHE") or Path.home() / ".cache" / "tianying") / "kernels"


def build(simd: bool = True, directory: Path | None = None) -> Path:
    """Compile cpu.cpp (or reuse the cached build); returns the shared library's path.

    `simd=False` builds the portable scalar path (tests compare both against the reference)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    flags = _flags(simd)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
    out = Path(directory or cache_dir()) / f"tianying_ops_{key}.so"
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
    lib.ty_run.argtypes = [_P, _L, _I]
    lib.ty_simd.argtypes = []
    lib.ty_simd.restype = _I
    for f in (lib.ty_gemm_i8, lib.ty_gemm_i4, lib.ty_dequant_i8, lib.ty_dequant_i4, lib.ty_run):
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
        warnings.warn(f"native CPU ops unavailable ({e}); decoding uses PyTorch's ops", stacklevel=3)
    return _LIB


def available() -> bool:
    """Whether the kernels are built and loaded here (whether they are used: `QuantLinear.path_for`)."""
    return _load() is not None


KF32, KBF16, KF16, KI8, KI4 = range(5)  # cpu.cpp's weight kinds
NORM_DTYPES = (torch.float32, torch.bfloat16)  # RMSNorm weights the ops read in place
DENSE_KINDS = {torch.float32: KF32, torch.bfloat16: KBF16, torch.float16: KF16}


class Proj(ctypes.Structure):
    """cpu.cpp's `Proj`: one weight's operands (dense: w, N, N8 = N, K, kind)."""

    _fields_ = [("w", _P), ("s", _P), ("o", _P), ("z", _P), ("N", _L), ("N8", _L), ("K", _L), ("kb", _L), ("G", _L),
                ("kind", _I), ("perm", _P)]


OP_LINEAR, OP_ATTEND, OP_MLP = range(3)


class Op(ctypes.Structure):
    """cpu.cpp's `Op`: one operation of a step with the addresses of its operands (see `linear`,
    `attend_decode`, `mlp` for what each kind reads)."""

    _fields_ = [("kind", _I), ("pre", _I), ("nbf16", _I), ("eps", ctypes.c_float), ("x", _P), ("M", _L), ("ldx", _L),
                ("norm", _P), ("goff", _L), ("voff", _L), ("p", ctypes.POINTER(Proj) * 3), ("y", _P), ("ldy", _L),
                ("add", _P), ("ldadd", _L), ("H", _L), ("KVH", _L), ("HD", _L), ("cos", _P), ("sin", _P),
                ("ldcs", _L), ("kc", _P), ("vc", _P), ("rs", _L), ("L", _L), ("pos", _P)]


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


# ------------------------------------------------------------------------------------------ model ops
class Weight:
    """One weight operand of `linear`: its `Proj`, what it was made from (`QuantLinear`'s tensors, which it
    keeps alive; a dense weight's address, dtype and shape), its N outputs and the columns it writes."""

    __slots__ = ("proj", "tensors", "N", "width", "ref")

    def __init__(self, proj: Proj, tensors: tuple, N: int, width: int, ref: weakref.ref | None = None) -> None:
        self.proj, self.tensors, self.N, self.width, self.ref = proj, tensors, N, width, ref

    def live(self) -> ctypes._Pointer:
        """A pointer to the operand for an `Op`; refused once the tensor it reads in place is gone."""
        if self.ref is not None and self.ref() is None:
            raise ValueError("ops: the weight tensor of this operand no longer exists")
        return ctypes.pointer(self.proj)

    # a copy or pickle of a module holding one gets nothing: it makes its own from its own tensors
    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (_nothing, ())


def _nothing() -> None:
    return None


def dense_weight(w: torch.Tensor) -> Weight | None:
    """An `nn.Linear` weight [N, K] (CPU, fp32/bf16/fp16, row-major) as an operand read in place, or None.

    The operand does not keep `w` alive (a cached one must not hold a replaced weight's memory); the ops refuse
    it once `w` is gone. `dense_weight_of(module)` keeps it with the module, keyed by the address, dtype and
    shape it was made from."""
    if (w.dtype not in DENSE_KINDS or w.device.type != "cpu" or w.dim() != 2 or not w.is_contiguous()
            or _load() is None):
        return None
    N, K = w.shape
    proj = Proj(w.data_ptr(), None, None, None, N, N, K, 0, 0, DENSE_KINDS[w.dtype], None)
    return Weight(proj, (w.data_ptr(), w.dtype, w.shape), N, N, weakref.ref(w))  # (not a reference: see above)


def dense_weight_of(m: torch.nn.Linear) -> Weight | None:
    """`dense_weight(m.weight)`, remembered on the module and remade whenever the weight's address, dtype or
    shape differ from what it was made from (`.data` swapped, `.to()`), so it always describes the weight as it
    is now. (A copy or pickle of the module carries no operand: see `Weight`.)"""
    w = m._parameters["weight"]
    op = m.__dict__.get("_ty_op")
    if op is not None and op.tensors[0] == w.data_ptr() and op.tensors[1] is w.dtype and op.tensors[2] == w.shape:
        return op
    op = dense_weight(w)
    m.__dict__["_ty_op"] = op
    return op


def quant_weight(qweight: torch.Tensor, ops: tuple, int8: bool, K: int, perm: torch.Tensor | None) -> Weight:
    """A `QuantLinear`'s canonical weight with its kernel operands (`operands`) and act-order `perm`."""
    kb, s, oz = ops
    N = qweight.shape[0]
    N8 = s.shape[0] * (1 if int8 else 8)
    ptr = None if oz is None else oz.data_ptr()
    proj = Proj(qweight.data_ptr(), s.data_ptr(), ptr if int8 else None, None if int8 else ptr, N, N8, K, kb,
                1 if int8 else s.shape[1], KI8 if int8 else KI4, None if perm is None else perm.data_ptr())
    return Weight(proj, (qweight, s, oz, perm), N, N8)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear_op(x: torch.Tensor, w0: Weight, w1: Weight | None, w2: Weight | None, norm: torch.Tensor | None,
               eps: float, swiglu: int, add: torch.Tensor | None) -> tuple[Op, torch.Tensor, tuple]:
    M, K = x.shape[0], w0.proj.K
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        raise ValueError("linear: x must be fp32 with unit column stride")
    if swiglu:
        pre = 2
        if swiglu < K or x.shape[1] < swiglu + K:
            raise ValueError(f"linear: a swiglu input needs gate and up columns of {K}, got {x.shape[1]}")
    elif norm is not None:
        pre = 1
        if x.shape[1] < K or norm.dtype not in NORM_DTYPES or norm.shape != (K,) or not norm.is_contiguous():
            raise ValueError("linear: norm needs fp32 or bf16 weights [K] and K input columns")
    else:
        pre = 0
        if x.shape[1] != K or not x.is_contiguous():
            x = x[:, :K].contiguous()
    ws = [w for w in (w0, w1, w2) if w is not None]
    if w2 is not None and w1 is None:
        raise ValueError("linear: w2 needs w1")
    if add is not None and (w1 is not None or add.dtype != torch.float32 or add.stride(-1) != 1):
        raise ValueError("linear: add needs one weight and an fp32 tensor with unit column stride")
    ldy = sum(w.width for w in ws)
    y = torch.empty(M, ldy, dtype=torch.float32)
    op = Op(kind=OP_LINEAR, pre=pre, nbf16=int(norm is not None and norm.dtype is torch.bfloat16), eps=eps,
            x=x.data_ptr(), M=M, ldx=x.stride(0), norm=_ptr(norm), goff=swiglu,
            y=y.data_ptr(), ldy=ldy, add=_ptr(add), ldadd=0 if add is None else add.stride(0))
    for i, w in enumerate(ws):
        op.p[i] = w.live()
    return op, y, (x, norm, add, *ws)


def _attend_op(qkv: torch.Tensor, heads: tuple[int, int, int], offsets: tuple[int, int], cos: torch.Tensor,
               sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: int, pos: torch.Tensor,
               o: Weight | None, add: torch.Tensor | None) -> tuple[Op, torch.Tensor, tuple]:
    H, KVH, HD = heads
    M = qkv.shape[0]
    st = keys.stride()
    if (keys.dtype not in (torch.float32, torch.bfloat16) or values.dtype is not keys.dtype or st[4] != 1
            or st[3] != HD or st[2] != keys.shape[3] * HD or values.stride() != st or pos.dtype is not torch.int64
            or not pos.is_contiguous() or pos.shape[0] != M or cos.dtype is not torch.float32
            or sin.dtype is not torch.float32 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or sin.shape != cos.shape
            or cos.shape[0] > 1 and sin.stride(0) != cos.stride(0) or qkv.dtype is not torch.float32
            or qkv.stride(1) != 1 or keys.shape[1] != M or o is not None and o.proj.K != H * HD
            or o is None and add is not None):
        raise ValueError("attend_decode: unsupported operand layout")
    if add is not None and (add.dtype is not torch.float32 or add.stride(1) != 1 or add.shape[1] < o.N):
        raise ValueError("attend_decode: add must be fp32 [M, N] with unit column stride")
    ldy = H * HD if o is None else o.width
    y = torch.empty(M, ldy, dtype=torch.float32)
    off = layer * st[0] * keys.element_size()
    op = Op(kind=OP_ATTEND, pre=int(keys.dtype is torch.bfloat16), x=qkv.data_ptr(), M=M, ldx=qkv.stride(0),
            goff=offsets[0], voff=offsets[1], y=y.data_ptr(), ldy=ldy, add=_ptr(add),
            ldadd=0 if add is None else add.stride(0), H=H, KVH=KVH, HD=HD, cos=cos.data_ptr(), sin=sin.data_ptr(),
            ldcs=0 if cos.shape[0] == 1 else cos.stride(0), kc=keys.data_ptr() + off,
            vc=values.data_ptr() + off, rs=st[1], L=keys.shape[3], pos=pos.data_ptr())
    if o is not None:
        op.p[0] = o.live()
    return op, y, (qkv, cos, sin, pos, add, o)  # (not the cache rows: see Graph)


def _mlp_op(x: torch.Tensor, gate: Weight, up: Weight, down: Weight, norm: torch.Tensor, eps: float,
            add: torch.Tensor | None) -> tuple[Op, torch.Tensor, tuple]:
    K = gate.proj.K
    if (x.dtype is not torch.float32 or x.stride(1) != 1 or x.shape[1] < K or up.proj.K != K
            or norm.dtype not in NORM_DTYPES or norm.shape != (K,) or not norm.is_contiguous()
            or down.proj.K != gate.N or up.N != gate.N
            or add is not None and (add.dtype is not torch.float32 or add.stride(1) != 1 or add.shape[1] < down.N)):
        raise ValueError("mlp: unsupported operand layout")
    M = x.shape[0]
    y = torch.empty(M, down.width, dtype=torch.float32)
    op = Op(kind=OP_MLP, nbf16=int(norm.dtype is torch.bfloat16), eps=eps, x=x.data_ptr(), M=M, ldx=x.stride(0),
            norm=norm.data_ptr(), y=y.data_ptr(),
            ldy=down.width, add=_ptr(add), ldadd=0 if add is None else add.stride(0))
    op.p[0], op.p[1], op.p[2] = gate.live(), up.live(), down.live()
    return op, y, (x, norm, add, gate, up, down)


def _run_now(built: tuple) -> torch.Tensor:
    (_LIB or _load()).ty_run(ctypes.byref(built[0]), 1, torch.get_num_threads())
    return built[1]


def linear(x: torch.Tensor, w0: Weight, w1: Weight | None = None, w2: Weight | None = None, *,
           norm: torch.Tensor | None = None, eps: float = 0.0, swiglu: int = 0,
           add: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, Σ width] fp32 = pre(x) · [W0; W1; W2]ᵀ (+ add), each weight's outputs in its own columns
    (`Weight.width` of them, the first `Weight.N` valid).

    x fp32 [M, ·] with unit column stride. pre: none ([M, K]), `norm` (RMSNorm with that weight, fp32 or
    bf16 [K], and `eps`), or `swiglu` > 0 (x = [gate | up], up from that column on: silu(gate) · up is the input).
    `add` fp32 [M, N]: the residual, added to W0's outputs (with W0 alone)."""
    return _run_now(_linear_op(x, w0, w1, w2, norm, eps, swiglu, add))


def attend_decode(qkv: torch.Tensor, heads: tuple[int, int, int], offsets: tuple[int, int], cos: torch.Tensor,
                  sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layer: int, pos: torch.Tensor, *,
                  o: Weight | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per row → [M, H·HD] fp32, or with the output projection `o` (and the
    residual `add` fp32 [M, N]) add + attention · Oᵀ [M, o.width].

    qkv fp32 [M, ·]: row m's query heads at columns [0, H·HD), keys at `offsets[0]`, values at `offsets[1]`
    (queries and keys unrotated; they are rotated in place). cos / signed sin fp32 [M or 1, HD]
    (`rope.rotation_tables`). keys/values [n_layer, M, KVH, L, HD] fp32 or bf16 (each row's slots contiguous;
    rows may be a slice of a larger cache): in `layer`, row m's rotated key and value are written at slot
    pos[m] and its heads attend to slots 0..pos[m] (GQA: H / KVH consecutive query heads per KV head)."""
    return _run_now(_attend_op(qkv, heads, offsets, cos, sin, keys, values, layer, pos, o, add))


def mlp(x: torch.Tensor, gate: Weight, up: Weight, down: Weight, norm: torch.Tensor, eps: float,
        add: torch.Tensor | None = None) -> torch.Tensor:
    """A block's MLP → [M, down.width] fp32: add + (silu(h·Gᵀ) · h·Uᵀ)·Dᵀ with h = RMSNorm(x) (weight `norm`
    fp32 or bf16 [K], `eps`), x and add fp32 [M, K] with unit column stride, in one parallel region."""
    return _run_now(_mlp_op(x, gate, up, down, norm, eps, add))


class Graph:
    """A sequence of the ops above recorded once and replayed by one C call, as a CUDA graph replays kernels.

    Recording calls `linear` / `attend_decode` / `mlp` here with the same arguments as the functions of this
    module: each returns its output tensor (allocated once, unfilled) and remembers the op; `run()` then
    computes them all in order in one OpenMP parallel region, reading the addresses that the recorded tensors
    have. A caller replays it by writing new values into the recorded input tensors (`copy_`) and reading the
    recorded outputs after `run()`. The graph keeps every recorded tensor and weight operand alive except the
    KV-cache rows, which belong to their cache: a caller replays it only while the rows it was recorded with
    are the current ones at the same addresses, and drops it when a weight it read is replaced (tianying.model's
    `DecodeGraph` does both)."""

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._keep: list = []
        self._array = None

    def _add(self, built: tuple) -> torch.Tensor:
        self._ops.append(built[0])
        self._keep.append((built[1], built[2]))  # the output too: a replay writes it whether or not it is read
        self._array = None
        return built[1]

    def linear(self, x, w0, w1=None, w2=None, *, norm=None, eps=0.0, swiglu=0, add=None):  # noqa: ANN001, ANN201
        return self._add(_linear_op(x, w0, w1, w2, norm, eps, swiglu, add))

    def attend_decode(self, qkv, heads, offsets, cos, sin, keys, values, layer, pos, *, o=None,  # noqa: ANN001, ANN201
                      add=None):
        return self._add(_attend_op(qkv, heads, offsets, cos, sin, keys, values, layer, pos, o, add))

    def mlp(self, x, gate, up, down, norm, eps, add=None):  # noqa: ANN001, ANN201
        return self._add(_mlp_op(x, gate, up, down, norm, eps, add))

    def run(self) -> None:
        if self._array is None:
            self._array = (Op * len(self._ops))(*self._ops)
        (_LIB or _load()).ty_run(self._array, len(self._ops), torch.get_num_threads())

    def __deepcopy__(self, memo: dict) -> None:  # (a copied model records its own)
        return None

    def __reduce__(self) -> tuple:
        return (_nothing, ())


@functools.cache
def _native_bf16() -> bool:
    return cpu_capability().startswith("AVX512") and bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def bf16_gemm() -> bool:
    """Whether a bf16 GEMM (fp32 sums) runs natively here: torch dispatches AVX512 code and the CPU has
    avx512_bf16 or AMX. Quantized prefill then multiplies its dequantized rows in bf16 (measured on a 2-core
    avx512_bf16 EPYC: 512×576 by 576×1536 at 136 GFLOP/s in bf16 against 41 in fp32), as llama.cpp rounds the
    activations of its quantized prefill to 8 bits. `TIANYING_PREFILL_BF16=0` keeps fp32."""
    return _native_bf16() and os.environ.get("TIANYING_PREFILL_BF16", "1") != "0"


FEW_ROWS = 16  # up to this many rows `linear` is used whatever the GEMM (measured: ≥ 1.5× PyTorch's)


def dense_gemm(dtype: torch.dtype, rows: int) -> bool:
    """Whether a product of `rows` rows with dense weights of `dtype` (prefill, batched forwards) should run on
    `linear` rather than PyTorch's GEMM: for few rows always; for more, bf16 / fp16 unless the CPU multiplies
    bf16 natively (oneDNN's kernels then run faster), fp32 if `linear` was faster than PyTorch's sgemm when
    both were timed here (once per process, `_ops_beat_sgemm`: MKL's speed differs by CPU vendor and
    generation). Only vector builds qualify; `TIANYING_DENSE_GEMM=0|1` overrides the choice."""
    if not enabled() or dtype not in DENSE_KINDS or simd_width() < 8:
        return False
    forced = os.environ.get("TIANYING_DENSE_GEMM")
    if forced in ("0", "1"):
        return forced == "1"
    if rows <= FEW_ROWS:
        return True
    if dtype is torch.float32:
        return _ops_beat_sgemm(torch.get_num_threads())
    return not _native_bf16()


def simd_width() -> int:
    """Lanes of the vectors the loaded build computes with: 16 (AVX-512), 8 (AVX2), 1 (portable), 0 (none)."""
    lib = _LIB or _load()
    return 0 if lib is None else lib.ty_simd()


@functools.cache
def _ops_beat_sgemm(threads: int) -> bool:
    """Times a 256×1024 by 1024×1024 fp32 product (best of 3) on `linear` and on PyTorch's GEMM."""
    import time

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    op = dense_weight(w)

    def best(f) -> float:  # noqa: ANN001
        f()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(lambda: linear(x, op)) < best(lambda: x @ w.t())


def enabled() -> bool:
    """Whether the model decodes with these ops (built here, and not switched off by TIANYING_NATIVE_OPS=0)."""
    return os.environ.get("TIANYING_NATIVE_OPS", "1") != "0" and _load() is not None
