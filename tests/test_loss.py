"""The chunked LM-head cross-entropy (tianying.train.loss) equals F.cross_entropy over full logits."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tianying.config import Config
from tianying.model import build_model
from tianying.train.loop import TokenLoss, _fusable_head
from tianying.train.loss import linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(n=37, d=24, V=301, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.3
    y = torch.randint(0, V, (n,), generator=g)
    if ignore:
        y[::4] = -100  # every fourth row (the first included) is not a target
    return h, w, y


def _reference(h, w, y, scale=1.0, autocast=False):
    """Loss and (dh, dw) the unfused way: full logits, upcast, F.cross_entropy summed."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = h @ w.t() if not autocast else F.linear(h, w)
    loss = F.cross_entropy(logits.float(), y, ignore_index=-100, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _fused(h, w, y, scale=1.0, autocast=False, chunk=None):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = linear_cross_entropy(h, w, y, chunk=chunk)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 16, None])
def test_fused_loss_and_gradients_equal_cross_entropy(chunk):
    h, w, y = _case()
    ref = _reference(h, w, y, scale=0.37)
    got = _fused(h, w, y, scale=0.37, chunk=chunk)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)
    assert torch.all(got[1][::4] == 0)  # ignored rows get no gradient


def test_fused_loss_under_bf16_autocast_matches_autocast_reference():
    h, w, y = _case(n=40, d=32, V=257, seed=1)
    ref = _reference(h, w, y, autocast=True)
    got = _fused(h, w, y, autocast=True, chunk=7)
    plain32 = _reference(h, w, y)[0]
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert abs(float(got[0]) - float(plain32)) > 1e-4  # bf16 logits really were used, as the reference does
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    # the gradients pass through bf16 matmuls on both sides: equal to bf16 rounding
    torch.testing.assert_close(got[1], ref[1], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=1e-3)


def test_hand_computed_loss_and_gradient():
    # h = [1, 0], w = [[1, 0], [0, 0]] → logits [1, 0]; target 1: loss = log(e + 1) − 0
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]], requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.tensor([1]))
    loss.backward()
    e = torch.e
    assert float(loss.detach()) == pytest.approx(float(torch.log(torch.tensor(e + 1.0))), rel=1e-6)
    p = torch.tensor([e / (e + 1), 1 / (e + 1)])  # softmax; dlogits = p − onehot(1)
    g = p - torch.tensor([0.0, 1.0])
    torch.testing.assert_close(w.grad, g[:, None] * h.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad, (g @ w.detach())[None], rtol=1e-6, atol=1e-7)


def test_all_ignored_is_zero_with_zero_gradients_and_no_grad_computes_nothing():
    h, w, y = _case(n=6)
    loss, dh, dw = _fused(h, w, torch.full_like(y, -100))
    assert float(loss) == 0.0 and torch.all(dh == 0) and torch.all(dw == 0)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hr, wr, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _reference(h, w, y)[0], rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient_and_h_still_does():
    h, w, y = _case()
    hr = h.clone().requires_grad_()
    linear_cross_entropy(hr, w, y).backward()
    torch.testing.assert_close(hr.grad, _reference(h, w, y)[1], rtol=1e-5, atol=1e-6)


def _tiny():
    cfg = Config.from_name("test-gqa")
    return build_model(cfg, seed=0), cfg


def test_token_loss_fused_equals_logits_path_for_every_parameter():
    model, cfg = _tiny()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, cfg.vocab_size, (2, 19), generator=g)
    y = torch.randint(0, cfg.vocab_size, (2, 19), generator=g)
    y[0, :7] = -100  # a masked prompt
    docs = torch.tensor([[0] * 10 + [1] * 9, [0] * 19])
    assert _fusable_head(model) is model.lm_head
    ce, _ = TokenLoss()(model, (x, y, docs), contextlib.nullcontext)
    ce.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = F.cross_entropy(model(x, doc_ids=docs).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(ce.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_wrapped_or_swapped_heads_use_the_logits_path():
    model, _ = _tiny()
    assert _fusable_head(nn.Sequential(model)) is None  # e.g. a DDP/FSDP wrapper
    model.lm_head = nn.Sequential(model.lm_head)  # e.g. a LoRA or quantized head
    assert _fusable_head(model) is None


def test_confidently_wrong_rows_keep_an_exact_loss():
    # logit gaps of ~200 nats: p_target underflows in fp32, the loss must still be the gap (not inf)
    h, w, y = _case(n=9, d=8, V=50, seed=2, ignore=False)
    w = w * 60.0
    ref = _reference(h, w, y)
    got = _fused(h, w, y, chunk=4)
    assert torch.isfinite(got[0]) and float(ref[0]) > 300
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)
