"""The native int8/int4 CPU kernels (tianying/quantize/native.cpp) against the reference path.

Reference: dequantize in fp32 (`dequantize`, the formula of the module docstring) then `F.linear`.
The GEMV kernels sum in a different order, so they agree to |Δ| ≤ 1e-5·(|x|·|Ŵ|ᵀ); the dequantize
functions use the reference's arithmetic and must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tianying.quantize import QuantLinear, QuantSpec, native
from tianying.quantize.linear import dequantize, quantize_rtn

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels could not be built (no C++ compiler)")


def _layer(n: int, k: int, spec: QuantSpec, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
    return QuantLinear.from_linear(lin, spec)


def _close(y: torch.Tensor, x: torch.Tensor, m: QuantLinear) -> None:
    w = m.dequantize()
    ref = F.linear(x.float(), w)
    mag = x.float().abs() @ w.abs().t()
    assert y.shape == ref.shape
    bad = (y.float() - ref).abs() > 1e-5 * mag + 1e-7
    assert not bad.any(), f"max |Δ| {(y.float() - ref).abs().max():.3g}"


def test_x8_layouts_match_a_hand_packed_example() -> None:
    q = torch.arange(10 * 4, dtype=torch.uint8).reshape(10, 4) % 16  # 10 rows: the second block is padded
    p = native.to_x8_i4(q)
    assert p.shape == (2, 2, 8)
    # byte (block b, column pair j, row r) = q[8b + r, 2j] | q[8b + r, 2j + 1] << 4
    assert p[0, 1, 3] == q[3, 2] | (q[3, 3] << 4)
    assert p[1, 0, 1] == q[9, 0] | (q[9, 1] << 4)
    assert (p[1, :, 2:] == 0).all()  # padded rows
    assert torch.equal(native.from_x8_i4(p, 10), q)
    w = torch.randint(-128, 128, (11, 6), dtype=torch.int8)
    p8 = native.to_x8_i8(w)
    assert p8.shape == (2, 6, 8) and p8[1, 5, 2] == w[10, 5]
    assert torch.equal(native.from_x8_i8(p8, 11), w)


SPECS = [QuantSpec(8, -1, True), QuantSpec(8, -1, False), QuantSpec(4, 32, True), QuantSpec(4, 16, False),
         QuantSpec(4, 128, True), QuantSpec(4, 64, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16, 17, 40])
def test_native_gemm_equals_reference(spec: QuantSpec, m: int) -> None:
    """Every activation-row blocking (1/2/4/8, passes of 16) and the dequantize + GEMM path (m > 16)."""
    n = 44 if spec.bits == 8 else 40  # int8: 44 rows pads the last 8-row block
    k = 256 if spec.group_size in (128, 64) else 96
    layer = _layer(n, k, spec)
    assert layer.layout == ("int8_x8" if spec.bits == 8 else "int4_x8")
    x = torch.randn(m, k)
    _close(layer(x), x, layer)


def test_native_handles_bf16_act_order_and_bias() -> None:
    spec = QuantSpec(4, 32, True)
    lin = torch.nn.Linear(64, 24, bias=True)
    q, s, z = quantize_rtn(lin.weight.detach(), spec)
    perm = torch.randperm(64)
    m = QuantLinear.from_int(q[:, perm], s, z, spec, perm=perm, bias=lin.bias)
    assert m.kernel(torch.ones(1, 64)) == "native"
    x = torch.randn(3, 64)
    ref = F.linear(x, m.dequantize(), lin.bias.detach())
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), F.linear(x.bfloat16().float(), m.dequantize(), lin.bias.detach()),
                               rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("spec", [QuantSpec(8, -1, False), QuantSpec(4, 16, False)], ids=str)
def test_native_dequantize_is_bit_exact(spec: QuantSpec) -> None:
    layer = _layer(44 if spec.bits == 8 else 40, 64, spec)
    ops = native.operands(layer.scales, layer.zeros, spec.bits == 8)
    full = dequantize(layer.int_weight(), layer.scales, layer.zeros)
    fn = native.dequant_i8 if spec.bits == 8 else native.dequant_i4
    for n0, n1 in [(0, full.shape[0]), (8, 24), (3, 17)]:
        assert torch.equal(fn(layer.qweight, ops, n0, n1), full[n0:n1])


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
    assert m.layout == "int8" and m.kernel(torch.ones(1, 64)) != "native"
    x = torch.randn(2, 64)
    torch.testing.assert_close(m(x), x @ m.dequantize().t(), rtol=2**-6, atol=1e-3)


def test_backend_env_selects_aten_or_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIANYING_QUANT_BACKEND", "aten")
    assert _layer(16, 64, QuantSpec(4, 32)).layout in ("tinygemm_cpu", "nibble")
    monkeypatch.setenv("TIANYING_QUANT_BACKEND", "reference")
    m = _layer(16, 64, QuantSpec(8))
    assert m.layout == "int8" and m.kernel(torch.ones(1, 64)) == "reference"
