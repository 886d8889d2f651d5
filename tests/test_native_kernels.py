"""The native int8/int4 CPU kernels (tianying/ops/cpu.cpp) against the reference path.

Reference: dequantize in fp32 (`dequantize`, the formula of the module docstring) then `F.linear`.
The GEMV kernels sum in a different order, so they agree to |Δ| ≤ 1e-5·(|x|·|Ŵ|ᵀ); the dequantize
functions use the reference's arithmetic and must agree bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tianying import ops as native
from tianying.quantize import QuantLinear, QuantSpec
from tianying.quantize.linear import dequantize, product_bound, quantize_rtn

pytestmark = [
    pytest.mark.skipif(not native.available(), reason="native kernels could not be built (no C++ compiler)"),
    pytest.mark.skipif(os.environ.get("TIANYING_QUANT_BACKEND", "auto") not in ("auto", "native"),
                       reason="TIANYING_QUANT_BACKEND forces another backend: the native kernels are not under test"),
]


def _layer(n: int, k: int, spec: QuantSpec, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    return QuantLinear.from_linear(lin, spec)


def _close(y: torch.Tensor, x: torch.Tensor, m: QuantLinear) -> None:
    """|Δ| ≤ Σ_blocks (max|x_block| / 65534)·|Ŵ_block| (int16 activation rounding) + 1e-5·|x|·|Ŵ|ᵀ (sum order),
    the backend's `product_bound`."""
    w = m.dequantize()
    if m.perm is not None:
        w, x = w[:, m.perm], x[..., m.perm]
    x = x.float().reshape(-1, w.shape[1])
    ref = F.linear(x, w)
    bound = product_bound(x, w, "native", m.spec)  # (above 16 rows on a CPU with native bf16: bf16 products)
    assert y.reshape(ref.shape).shape == ref.shape
    err = (y.float().reshape(ref.shape) - ref).abs()
    assert (err <= bound).all(), f"max |Δ| {err.max():.3g} vs bound {bound.min():.3g}"


@pytest.mark.parametrize("spec", [QuantSpec(8, -1, False), QuantSpec(4, 16, False), QuantSpec(4, 32, True)], ids=str)
def test_kernels_read_the_canonical_layout_column_by_column(spec: QuantSpec) -> None:
    """x = e_k picks column k of Ŵ: the kernel must return Ŵ[:, k] for every k (pins the byte and nibble
    order, the chunked activation order and a last partial 8-row block)."""
    layer = _layer(44 if spec.bits == 8 else 40, 64, spec)
    w = layer.dequantize()
    eye = torch.eye(64)
    y = layer(eye)  # 64 rows: dequantize + GEMM; row by row: the GEMV kernels
    rows = torch.cat([layer(eye[k:k + 1]) for k in range(64)])
    # (64 rows on a CPU with native bf16 multiply Ŵ rounded to bf16: 2⁻⁹ relative; a wrong column is off by ~1)
    torch.testing.assert_close(y, w.t(), rtol=2**-8 if native.bf16_gemm() else 2e-5, atol=1e-7)
    torch.testing.assert_close(rows, w.t(), rtol=2e-5, atol=1e-7)


def test_activation_block_choice() -> None:
    assert native.act_block(768, 128) == 128 and native.act_block(768, 768) == 256
    assert native.act_block(688, 16) == 16 and native.act_block(688, 688) == 16  # 688 = 16·43
    assert native.supports(688, 16) and not native.supports(66, -1) and not native.supports(96, 8)


SPECS = [QuantSpec(8, -1, True), QuantSpec(8, -1, False), QuantSpec(4, 32, True), QuantSpec(4, 16, False),
         QuantSpec(4, 128, True), QuantSpec(4, 64, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16, 17, 40])
def test_native_gemm_equals_reference(spec: QuantSpec, m: int) -> None:
    """Every activation-row blocking (1/2/4/8, passes of 16) and the dequantize + GEMM path (m > 16)."""
    n = 44 if spec.bits == 8 else 40  # int8: 44 rows pads the last 8-row block
    k = 256 if spec.group_size in (128, 64) else 96
    layer = _layer(n, k, spec)
    x = torch.randn(m, k)
    assert layer.kernel(x) == "native"
    _close(layer(x), x, layer)


def test_native_handles_bf16_act_order_and_bias() -> None:
    spec = QuantSpec(4, 32, True)
    lin = torch.nn.Linear(64, 24, bias=True)
    q, s, z = quantize_rtn(lin.weight.detach(), spec)
    perm = torch.randperm(64)
    m = QuantLinear.from_int(q[:, perm], s, z, spec, perm=perm, bias=lin.bias)
    assert m.kernel(torch.ones(1, 64)) == "native"
    x = torch.randn(3, 64)
    _close(m(x) - lin.bias.detach(), x, m)
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), F.linear(x.bfloat16().float(), m.dequantize(), lin.bias.detach()),
                               rtol=2**-7, atol=2**-7)


def test_int16_activation_error_is_relative_to_the_block() -> None:
    """An outlier in one block does not coarsen the rounding of the others."""
    layer = _layer(16, 512, QuantSpec(8))
    x = torch.randn(1, 512)
    x[0, 3] = 1000.0
    _close(layer(x), x, layer)


@pytest.mark.parametrize("spec", [QuantSpec(8, -1, False), QuantSpec(4, 16, False), QuantSpec(4, 32, True),
                                  QuantSpec(4, 128, False)], ids=str)
def test_native_dequantize_is_bit_exact(spec: QuantSpec) -> None:
    layer = _layer(44 if spec.bits == 8 else 40, 256 if spec.group_size == 128 else 64, spec)
    full = dequantize(layer.int_weight(), layer.scales, layer.zeros)
    fn = native.dequant_i8 if spec.bits == 8 else native.dequant_i4
    for n0, n1 in [(0, full.shape[0]), (8, 24), (3, 17)]:
        assert torch.equal(fn(layer.qweight, layer.scales, layer.zeros, n0, n1), full[n0:n1])


def test_thread_count_does_not_change_results() -> None:
    layer = _layer(64, 128, QuantSpec(4, 32, True))
    x = torch.randn(2, 128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = layer(x)
        torch.set_num_threads(2)
        y2 = layer(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_portable_scalar_build_equals_reference(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The non-AVX2 code path (other CPUs) computes the same thing."""
    lib = native.bind(native.build(simd=False, directory=tmp_path))
    monkeypatch.setattr(native, "_LIB", lib)
    for spec in (QuantSpec(8, -1, False), QuantSpec(4, 32, False)):
        layer = _layer(40, 64, spec)
        for m in (1, 3, 20):
            x = torch.randn(m, 64)
            _close(layer(x), x, layer)


def test_no_compiler_falls_back_with_a_warning(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("TIANYING_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert not native.available()
    m = _layer(16, 64, QuantSpec(8))
    assert m.kernel(torch.ones(1, 64)) != "native"
    x = torch.randn(2, 64)
    w = m.dequantize()
    assert ((m(x) - x @ w.t()).abs() <= 2**-6 * (x.abs() @ w.abs().t()) + 1e-6).all()  # PyTorch's bf16 kernels


def test_backend_env_selects_aten_or_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIANYING_QUANT_BACKEND", "aten")
    assert _layer(16, 64, QuantSpec(4, 32)).kernel(torch.ones(1, 64)) in ("int4_cpu", "reference")
    monkeypatch.setenv("TIANYING_QUANT_BACKEND", "reference")
    m = _layer(16, 64, QuantSpec(8))
    assert m.kernel(torch.ones(1, 64)) == "reference"
    monkeypatch.setenv("TIANYING_QUANT_BACKEND", "native")
    assert m.kernel(torch.ones(1, 64)) == "native"
