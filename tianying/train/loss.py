"""Cross-entropy over a large vocabulary without the full logits: the LM head and the loss in one step.

`F.cross_entropy(lm_head(h).float(), y, reduction="sum")` materialises [N, V] fp32 logits, their
log-softmax and, in backward, their gradient — three N×V buffers (64 MiB each for 1024 tokens of a 16K
vocabulary) that are streamed through memory several times. `linear_cross_entropy` computes the same sum from
the final hidden states h in chunks of rows: per chunk the logits, their softmax (whose log at the target is
the loss) and, when a gradient is wanted, softmax − one-hot, which is multiplied straight away into dh (this
chunk's rows) and dW (accumulated over chunks). So the gradients are computed in the forward, while the chunk
is still in cache; backward only scales them by the incoming gradient (the loop's 1/token-count). No extra
matmul is done (no recomputation) and peak memory holds one chunk's logits instead of three full copies.

Rows whose target is `ignore_index` are dropped before the head is applied: an SFT batch, where prompts are
masked, pays the LM head only for the reply tokens.

Numerics follow the unfused path exactly: the head runs in the autocast dtype when autocast is on (else h's
dtype), logits are upcast to fp32 for the softmax, the logits' gradient is cast back to the head's dtype
before its two matmuls (as autograd does through the cast), and dW accumulates in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_LOGITS = 1 << 23


def _chunk_rows(vocab: int) -> int:
    """Rows per chunk: ~8M logits (32 MiB fp32), but never fewer than 256. Measured on a 2-core Zen 4 (16K
    vocabulary, d 256, 1024 rows, head + loss forward and backward): 2 threads 165 ms at 256 rows, 151–165 at
    512 and 1024, 227–271 unfused; 1 thread best at 256–512. Below ~128 rows MKL's dW += gᵀx (K = rows) and the
    head GEMMs lose efficiency (100K vocabulary, 1 thread: 48 rows 3.1 s, 256 rows 2.1 s, unfused 2.8 s)."""
    return max(256, min(1024, CHUNK_LOGITS // max(vocab, 1)))


_SCRATCH: dict = {}


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer kept for the next step on CPU: a fresh 16 MiB allocation per step is fresh pages from the
    kernel, and their first-touch faults cost as much as the chunk's softmax (CUDA's allocator caches already)."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    key = (name, dtype, device)
    t = _SCRATCH.get(key)
    if t is None or t.numel() < numel:
        t = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return t[:numel]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, cdt, want_h, want_w):
        dev = h.device.type
        with torch.autocast(dev, enabled=False):
            x_all = h if h.dtype == cdt else h.to(cdt)
            w = weight if weight.dtype == cdt else weight.to(cdt)
            n, V = x_all.shape[0], w.shape[0]
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            dh = torch.empty_like(x_all) if want_h else None
            dw = torch.empty(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
            rows = min(chunk, n)
            buf = _scratch("logits", rows * V, cdt, h.device).view(rows, V)
            prob = _scratch("softmax", rows * V, torch.float32, h.device).view(rows, V)
            for s in range(0, n, chunk):
                x, y = x_all[s:s + chunk], targets[s:s + chunk]
                c = x.shape[0]
                z = torch.mm(x, w.t(), out=buf[:c])
                z = z if z.dtype == torch.float32 else z.float()
                # the loss from the softmax itself (softmax costs a third of log_softmax followed by exp on CPU):
                # log p_t to fp32 precision while p_t is a normal float; the rare rows where it underflows take
                # log p_t = z_t − logsumexp(z) instead
                g = torch.softmax(z, dim=1, out=prob[:c])
                pt = g.gather(1, y[:, None]).squeeze(1)
                small = pt < 1e-30
                if bool(small.any()):
                    r = small.nonzero().squeeze(1)
                    pt = pt.log().index_put((r,), z[r].gather(1, y[r, None]).squeeze(1) - torch.logsumexp(z[r], 1))
                    loss -= pt.sum()
                else:
                    loss -= pt.log().sum()
                if dh is None and dw is None:
                    continue
                g.scatter_add_(1, y[:, None], torch.full((c, 1), -1.0, dtype=g.dtype, device=g.device))
                g = g if g.dtype == cdt else g.to(cdt)
                if dh is not None:
                    torch.mm(g, w, out=dh[s:s + c])
                if dw is not None:  # the first chunk writes dW (no zero-fill), the others add to it
                    if cdt != torch.float32:
                        part = torch.mm(g.t(), x).float()
                        dw.copy_(part) if s == 0 else dw.add_(part)
                    elif s == 0:
                        torch.mm(g.t(), x, out=dw)
                    else:
                        dw.addmm_(g.t(), x)
        ctx.save_for_backward(dh, dw)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        if dh is not None:
            dh = (dh.to(ctx.h_dtype) if dh.dtype != ctx.h_dtype else dh).mul_(grad)
        if dw is not None:
            dw = (dw.to(ctx.w_dtype) if dw.dtype != ctx.w_dtype else dw).mul_(grad)
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """Σ cross_entropy(h @ weightᵀ, targets) over the targets that are not `ignore_index` (an fp32 scalar).

    h [..., d] final hidden states (normed), weight [V, d] the LM head, targets [...] aligned with h's rows.
    Equals `F.cross_entropy((h @ weight.T).float(), targets, ignore_index=..., reduction="sum")` — including
    under autocast — with gradients for h and weight; `chunk` rows at a time (default ~8M logits per chunk).
    """
    d = h.shape[-1]
    h, targets = h.reshape(-1, d), targets.reshape(-1)
    keep = targets != ignore_index
    if not bool(keep.all()):  # score only the labelled rows; dh of the others is zero
        idx = keep.nonzero().squeeze(1)
        sub = linear_cross_entropy(h.index_select(0, idx), weight, targets.index_select(0, idx), ignore_index, chunk)
        return sub
    dev = h.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    grad = torch.is_grad_enabled()
    want_h, want_w = grad and h.requires_grad, grad and weight.requires_grad
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()) * 0.0  # keeps the graph (and the zero gradients) of an empty batch
    return _LinearCrossEntropy.apply(h, weight, targets, chunk or _chunk_rows(weight.shape[0]), cdt, want_h, want_w)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The unfused reference: summed fp32 cross-entropy of logits [..., V] against targets [...]."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction="sum")
