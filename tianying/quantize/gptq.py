"""GPTQ (Frantar et al., 2022): quantize a layer's weights column by column, compensating each rounding error
on the columns not yet quantized, so that the layer's *output* on calibration inputs moves least.

For a linear layer with weight W [N, K] and inputs X [K, T] the objective is ‖WX − ŴX‖²_F, whose Hessian
with respect to each row of W is H = 2XXᵀ (the same for every row). Quantizing column j to q_j leaves an
error e = (w_j − q_j) / [H⁻¹]_jj, and the optimal update of the remaining columns (OBS) is
W[:, j:] −= e · [H⁻¹]_{j, j:}. Using the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) gives the rows of the
successively reduced inverses directly, so the whole layer costs one Cholesky plus O(N·K²) updates, done
in blocks of 128 columns (lazy batch updates). Damping λ = damp · mean(diag H) keeps H invertible;
act-order (`desc_act`) visits columns by decreasing diag(H) (the most-used inputs first).

Model-level: layer inputs are captured with forward hooks, block by block; inside a block the linears are
quantized in execution order (q/k/v, o, gate/up, down: "true sequential"), each seeing the outputs of the
already-quantized ones, and the quantized block's outputs feed the next block.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from tianying.quantize.linear import (
    QuantizeError,
    QuantLinear,
    QuantSpec,
    find_params,
    quantize_group,
    resolve_group_size,
    set_submodule,
)

# linears of one Aquila block in execution order; members of a group read the same input
SEQUENTIAL = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, damp: float = 0.01,
                         act_order: bool = False, block_size: int = 128
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ on one weight W [N, K] with Hessian H [K, K].

    Returns (q uint8 [N, K] in stored order, scales fp16 [G, N], zeros int16 [G, N], perm or None), ready
    for `QuantLinear.from_int`: with act-order, stored column i is input column perm[i] and groups are
    formed along that order (as GPTQ's g_idx describes).
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    N, K = W.shape
    spec.check(K, N)
    g = spec.group_width(K)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp)

    if spec.group_size != -1:
        block_size = g * max(1, block_size // g)  # a group never straddles two blocks
    Q = torch.zeros(N, K, dtype=torch.uint8)
    scales, zeros = [], []
    if spec.group_size == -1:
        scale, zero = find_params(W, spec)
        scales.append(scale)
        zeros.append(zero)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if spec.group_size != -1 and (i1 + i) % g == 0:
                scale, zero = find_params(W1[:, i:i + g], spec)  # on the error-updated weights
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            q = quantize_group(w[:, None], scale, zero, spec.maxq)[:, 0]
            Q[:, i1 + i] = q
            err = (w - (q.float() - zero.float()) * scale.float()) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, torch.stack(scales), torch.stack(zeros), perm


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ tenfold (up to 3 times) if H is not positive definite."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(4):
        lam = damp * (10 ** attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise QuantizeError(f"the Hessian is not positive definite even with damping {damp * 1000:g}·mean(diag); "
                        "use more calibration samples")


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """‖WX − ŴX‖²_F / T from H = 2XXᵀ/T: tr(ΔW H ΔWᵀ) / 2."""
    d = (W.float() - W_hat.float())
    return float((d @ H * d).sum() / 2)


class _Stop(Exception):
    pass


@torch.no_grad()
def gptq_quantize(model: nn.Module, samples: Sequence[torch.Tensor], bits: int = 4, group_size: int | None = None,
                  sym: bool = True, act_order: bool = False, damp: float = 0.01,
                  skip: tuple[str, ...] = ("lm_head",), progress: bool = True, lm_head: bool = False
                  ) -> dict[str, float]:
    """GPTQ every linear in `model.model.layers` in place; returns {layer name: relative output error}.

    Args:
        samples: token-id tensors [T] or [1, T] (calibration text), run one at a time.
        group_size: None → the default with fallback (`resolve_group_size`), counting the head if `lm_head`.
        lm_head: also quantize the LM head, by rounding (its input Hessian would need a pass through every
            block after quantization; rounding keeps GPTQ's cost per block).
    """
    targets = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.startswith("model.layers.") and not name.endswith(skip)}
    head = getattr(model, "lm_head", None) if lm_head else None
    widths = {n: m.in_features for n, m in targets.items()}
    if isinstance(head, nn.Linear):
        widths["lm_head"] = head.in_features
    spec = QuantSpec(bits, resolve_group_size(bits, group_size, widths), sym)
    blocks = model.model.layers
    for name, m in targets.items():
        spec.check(m.in_features, m.out_features, name)
    if not samples:
        raise QuantizeError("GPTQ needs at least one calibration sample")
    device = next(model.parameters()).device

    # inputs of block 0 (hidden states and the rope/mask arguments), one entry per sample
    inputs: list[tuple] = []

    def catch(_mod: nn.Module, args: tuple) -> None:
        inputs.append(args)
        raise _Stop

    h = blocks[0].register_forward_pre_hook(catch)
    try:
        for s in samples:
            try:
                model(s.reshape(1, -1).to(device))
            except _Stop:
                pass
    finally:
        h.remove()

    errors: dict[str, float] = {}
    bar = _progress(len(blocks), progress)
    for b, block in enumerate(blocks):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        order = [grp for grp in SEQUENTIAL if all(n in linears for n in grp)]
        rest = [n for n in linears if not any(n in grp for grp in order)]
        order += [[n] for n in rest]
        for grp in order:
            Hs = _collect_hessian(block, linears[grp[0]], inputs)
            for n in grp:
                full = f"model.layers.{b}.{n}"
                if full.endswith(skip):
                    continue
                lin = linears[n]
                q, scales, zeros, perm = gptq_quantize_weight(lin.weight, Hs, spec, damp, act_order)
                layer = QuantLinear.from_int(q, scales, zeros, spec, perm=perm, bias=lin.bias,
                                             dtype=lin.weight.dtype).to(device)
                err = reconstruction_error(lin.weight, layer.dequantize(), Hs)
                errors[full] = err / max(reconstruction_error(lin.weight, torch.zeros_like(lin.weight), Hs), 1e-30)
                set_submodule(block, n, layer)
        inputs = [(block(*args),) + tuple(args[1:]) for args in inputs]  # quantized block feeds the next
        bar.update(b, errors)
    bar.close()
    if isinstance(head, nn.Linear):
        spec.check(head.in_features, head.out_features, "lm_head")
        model.lm_head = QuantLinear.from_linear(head, spec).to(device)
    return errors


def _collect_hessian(block: nn.Module, lin: nn.Module, inputs: list[tuple]) -> torch.Tensor:
    """H = 2/T Σ x xᵀ over every token the layer sees when the block runs on the calibration inputs."""
    K = lin.in_features
    H = torch.zeros(K, K, dtype=torch.float32)
    count = [0]

    def hook(_mod: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, K).float().cpu()
        H.addmm_(x.t(), x)
        count[0] += x.shape[0]

    h = lin.register_forward_pre_hook(hook)
    try:
        for args in inputs:
            block(*args)
    finally:
        h.remove()
    return H * (2.0 / max(count[0], 1))


class _progress:
    """A per-layer progress bar on stderr (tqdm when installed), showing the mean relative output error."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="GPTQ", unit="layer", file=sys.stderr)
            except ImportError:
                pass

    def update(self, b: int, errors: dict[str, float]) -> None:
        if self.bar is not None:
            mine = [v for k, v in errors.items() if k.startswith(f"model.layers.{b}.")]
            self.bar.set_postfix(rel_err=f"{sum(mine) / max(len(mine), 1):.2e}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
