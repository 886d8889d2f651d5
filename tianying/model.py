"""The Aquila transformer, one file.

Aquila / Aquila2 is a LLaMA-shaped decoder (seed-spec §1.1):
- pre-norm blocks: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)); RMSNorm variance in fp32
- rotary position embeddings in the rotate-half layout, angles computed in fp32 (tianying.rope), with
  optional `rope_scaling` (linear position interpolation for the released 16K chat models)
- grouped-query attention (n_kv_head ≤ n_head; KV heads shared by consecutive query heads) via SDPA
- SwiGLU MLP: down(silu(gate(x)) · up(x))
- no biases anywhere; untied input embedding and LM head; no embedding scaling
- long-context switches, all off by default (issue 8; not in Aquila's code): RoPE scaling kinds (tianying.rope),
  LogN query scaling beyond the training length, sliding-window attention with optional sink tokens (the
  `KVCache` then keeps a ring of window + sink slots per row, so memory stays flat however long generation runs)

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`) so a
transformers state dict loads with no renaming. Generation (tianying.engine) gives the model positions and
rows of one preallocated `KVCache`; the model only calls the cache's step protocol (`begin`/`update`/`end`,
and `rows_for_ops` for a decode step on the native CPU ops of tianying.ops, which each layer calls in place of
its PyTorch ops when they serve its weights). When they serve every layer and the head, the step's op calls
are recorded once per batch shape and KV-cache rows (`DecodeGraph`) and replayed by one C call afterwards.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tianying import ops
from tianying.config import Config
from tianying.rope import apply_rotation, logn_scale, rope_cos_sin, rotation_tables

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa arrived in 2.5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._eps: dict = {}  # device → eps as an fp32 tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x·rsqrt(eps + Σx²/d) written with few ops (it runs 2n+1 times per decode step): F.rms_norm and
        # pow/mean/+eps each cost 2–4× as much per call on CPU, and an eps tensor avoids wrapping a scalar
        x32 = x.float()
        eps = self._eps.get(x.device)
        if eps is None:
            with torch.inference_mode(False):  # a normal tensor, so training may follow generation
                eps = self._eps[x.device] = torch.tensor(self.eps, dtype=torch.float32, device=x.device)
        r = torch.rsqrt(torch.add(eps, torch.sum(x32 * x32, dim=-1, keepdim=True), alpha=1 / x.shape[-1]))
        return self.weight * (x32 * r).to(x.dtype)


class KVCache:
    """Keys/values of `rows` sequences, each with its own length: [n_layer, rows, n_kv_head, slots, head_dim].

    Row r holds positions 0 … lengths[r]−1 of its sequence (keys after RoPE). Without a window a row has
    `capacity` slots and position j lives in slot j. With the config's `attention_window` W and
    `attention_sinks` S the same class keeps only
    S + W slots per row whatever the length: position j lives in slot j if j < S, else in S + (j − S) mod W,
    so a row always holds its sinks and the W most recent positions — exactly the keys a window-W query can
    still see (slot order does not matter to attention).

    The model sees the cache only through `begin(T)` → a step (`positions`, `mask`, `update`) and `end(step)`;
    `view(lo, hi)` gives the same protocol over a range of rows, which is how the engine runs a decode step
    for every active row and a prefill chunk for one.
    """

    def __init__(self, cfg: Config, rows: int, capacity: int, dtype: torch.dtype, device: torch.device | str) -> None:
        window = cfg.attention_window  # the config's attention decides the layout: a window keeps a ring
        self.window, self.sinks = (int(window), int(cfg.attention_sinks or 0)) if window else (None, 0)
        self.slots = self.window + self.sinks if self.window else int(capacity)
        self.capacity = 2**62 if self.window else int(capacity)  # positions a row may reach
        shape = (cfg.n_layer, rows, cfg.n_kv_head, self.slots, cfg.head_dim)
        # empty: untouched pages cost no memory, so rows × context can be sized generously. A ragged step
        # multiplies masked-out slots too, and uninitialised memory may hold NaN (0 · NaN is NaN), so slots a row
        # never wrote are zeroed the first time a step reads past them (`written`).
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.rows = rows
        self.lengths = [0] * rows
        self.written = [0] * rows  # slots [0, written) of a row hold finite values

    @classmethod
    def for_model(cls, model: nn.Module, rows: int, capacity: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A cache shaped for `model` (its config's window/sinks, its compute dtype and device)."""
        cfg = model.config
        p = next(model.parameters())
        dtype = dtype or getattr(model, "compute_dtype", p.dtype)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            dtype = torch.float32
        return cls(cfg, rows, capacity, dtype, device or p.device)

    @property
    def pos(self) -> int:
        """The common length of every row (for single-sequence use)."""
        if len(set(self.lengths)) != 1:
            raise ValueError(f"rows have different lengths {self.lengths}")
        return self.lengths[0]

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self, row: int | None = None) -> None:
        for r in range(self.rows) if row is None else (row,):
            self.lengths[r] = 0

    def view(self, lo: int, hi: int, active: set[int] | None = None) -> CacheRows:
        """Rows [lo, hi); with `active`, only those rows advance. The others (idle, or still prefilling) write
        one slot past their length in a one-token step, which their next real write overwrites."""
        return CacheRows(self, lo, hi, active)

    def begin(self, T: int, device: torch.device | None = None) -> CacheStep:
        return CacheStep(self, 0, self.rows, T)

    def end(self, step: CacheStep, active: set[int] | None = None) -> None:
        for r in range(step.lo, step.hi) if active is None else active:
            self.lengths[r] += step.T

    def slot(self, j: torch.Tensor) -> torch.Tensor:
        """Slot of absolute positions `j` (identity without a window)."""
        if not self.window:
            return j
        S = self.sinks
        return torch.where(j < S, j, S + (j - S) % self.window)

    def held_positions(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Absolute positions in slots 0 … held−1 of a row of length `n`."""
        if not self.window:
            return torch.arange(n, device=device)
        S, W = self.sinks, self.window
        sinks = torch.arange(min(n, S), device=device)
        m = max(n - S, 0)  # non-sink tokens seen
        r = torch.arange(min(m, W), device=device)
        return torch.cat([sinks, S + r + W * torch.div(m - 1 - r, W, rounding_mode="floor")])

    def copy_row(self, src: int, dst: int, n: int | None = None) -> None:
        """Row `dst` becomes the first `n` (default all) positions of row `src` (n > 1 choices of one prompt)."""
        n = self.lengths[src] if n is None else n
        held = min(n, self.slots)
        if self.window and n > self.sinks + self.window and n != self.lengths[src]:
            raise ValueError("a window row can only be copied whole")
        self.k[:, dst, :, :held] = self.k[:, src, :, :held]
        self.v[:, dst, :, :held] = self.v[:, src, :, :held]
        self.lengths[dst] = n
        self.written[dst] = max(self.written[dst], held)


class CacheRows:
    """Rows [lo, hi) of a KVCache, with the cache's step protocol."""

    def __init__(self, cache: KVCache, lo: int, hi: int, active: set[int] | None = None) -> None:
        self.cache, self.lo, self.hi, self.active = cache, lo, hi, active

    def begin(self, T: int, device: torch.device | None = None) -> CacheStep:
        return CacheStep(self.cache, self.lo, self.hi, T)

    def end(self, step: CacheStep) -> None:
        self.cache.end(step, self.active)


class CacheStep:
    """What one forward of T new tokens per row needs: rotary positions, the attention mask, and `update`,
    which writes a layer's new keys/values and returns the keys/values to attend to.

    T = 1 allows rows of different lengths (a batched decode step: each row writes at its own slot, and a
    mask hides the slots past a row's length when lengths differ). T > 1 (a prefill chunk) needs rows of
    equal length; with a window the chunk attends to [held slots, its own keys] and then writes its last
    entries, so a chunk may be longer than the window.
    """

    def __init__(self, cache: KVCache, lo: int, hi: int, T: int) -> None:
        self.cache, self.lo, self.hi, self.T = cache, lo, hi, T
        lengths = cache.lengths[lo:hi]
        self.lengths = lengths
        self.uniform = len(set(lengths)) == 1
        n = lengths[0]
        if T > 1 and not self.uniform:
            raise ValueError(f"a {T}-token step needs rows of equal length, got {lengths}")
        if max(lengths) + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; asked for {max(lengths) + T}")
        self.k_rows, self.v_rows = cache.k[:, lo:hi], cache.v[:, lo:hi]
        self._write: tuple | None = None
        self.mask: torch.Tensor | None = None
        self.is_causal = False
        device = cache.k.device
        W, slots = cache.window, cache.slots
        # rotary positions: None means start + arange(T), a slice of the model's table (no index arithmetic)
        self.start = n if self.uniform else None
        self.positions = None if self.uniform else torch.tensor(lengths, device=device)[:, None]
        if T == 1:
            held = [min(x + 1, slots) for x in lengths]
            self.keys = max(held)
            if self.uniform:
                s = n if not W else (n if n < cache.sinks else cache.sinks + (n - cache.sinks) % W)
                self._write = ("narrow", s)
                for r in range(lo, hi):
                    cache.written[r] = max(cache.written[r], s + 1)
            else:
                for r in range(lo, hi):  # every row reads `keys` slots: none of them may be uninitialised
                    if cache.written[r] < self.keys:
                        cache.k[:, r, :, cache.written[r]:self.keys] = 0
                        cache.v[:, r, :, cache.written[r]:self.keys] = 0
                        cache.written[r] = self.keys
                pos = torch.tensor(lengths, device=device)
                self._write = ("rows", torch.arange(hi - lo, device=device), cache.slot(pos))
                self.mask = (torch.arange(self.keys, device=device)[None, :]
                             < torch.tensor(held, device=device)[:, None])[:, None, None, :]
            return
        q_idx = torch.arange(n, n + T, device=device)
        for r in range(lo, hi):
            cache.written[r] = max(cache.written[r], min(n + T, slots))
        if not W:
            self._write = ("narrow", n)
            self.keys = n + T
            if n == 0:
                self.is_causal = True
            else:
                self.mask = (torch.arange(n + T, device=device)[None, :] <= q_idx[:, None])[None, None]
            return
        # window chunk: keys = the held slots (in slot order) followed by the chunk's own keys
        S = cache.sinks
        k_idx = torch.cat([cache.held_positions(n, device), q_idx])
        q, k = q_idx[:, None], k_idx[None, :]
        self.mask = ((k <= q) & ((k > q - W) | (k < S)))[None, None]
        new_slots = cache.slot(q_idx)
        last = torch.full((slots,), -1, dtype=torch.long, device=device)  # only the last write to a slot stays
        last.scatter_reduce_(0, new_slots, torch.arange(T, device=device), reduce="amax")
        keep = last[last >= 0]
        self._write = ("ring", min(n, slots), new_slots[keep], keep)
        self.keys = None

    def rows_for_ops(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys, values [n_layer, B, n_kv_head, slots, D], each row's write position [B] int64) for
        `ops.attend_decode`, which writes slot = length itself; None when this step is not one it handles (a
        chunk, a window ring, a dtype or device it does not read)."""
        k = self.k_rows
        if (self.T != 1 or self.cache.window or k.device.type != "cpu" or k.dtype not in (torch.float32, torch.bfloat16)
                or not self.cache.k.is_contiguous() or not self.cache.v.is_contiguous()):
            return None
        return k, self.v_rows, torch.tensor(self.lengths, dtype=torch.int64)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, n_kv_head, T, D] → the keys/values to attend to [B, n_kv_head, keys, D]."""
        kc, vc = self.k_rows[layer], self.v_rows[layer]
        how = self._write
        if how[0] == "narrow":
            kc.narrow(2, how[1], self.T).copy_(k)
            vc.narrow(2, how[1], self.T).copy_(v)
            return kc.narrow(2, 0, self.keys), vc.narrow(2, 0, self.keys)
        if how[0] == "rows":
            _, b, s = how
            kc[b, :, s] = k[:, :, 0]
            vc[b, :, s] = v[:, :, 0]
            return kc.narrow(2, 0, self.keys), vc.narrow(2, 0, self.keys)
        _, held, slots, keep = how
        k_all = torch.cat([kc.narrow(2, 0, held), k], dim=2)
        v_all = torch.cat([vc.narrow(2, 0, held), v], dim=2)
        kc.index_copy_(2, slots, k.index_select(2, keep))
        vc.index_copy_(2, slots, v.index_select(2, keep))
        return k_all, v_all


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: CacheStep | None, qscale: torch.Tensor | None = None) -> torch.Tensor:
        """cos/sin from `rope.rotation_tables`; `qscale` [B or 1, 1, T, 1] multiplies the rotated queries (LogN
        scaling); None leaves them."""
        B, T, _ = x.shape
        q = project(self.q_proj, x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = project(self.k_proj, x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = project(self.v_proj, x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotation(q, cos, sin), apply_rotation(k, cos, sin)
        if qscale is not None:
            q = q * qscale
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.n_kv_head != self.n_head:
            if _SDPA_HAS_GQA:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
            else:  # torch < 2.5
                rep = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.down_proj, F.silu(project(self.gate_proj, x)) * project(self.up_proj, x))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache, qscale=None, rows=None):
        if rows is not None:  # a decode step on the native ops (Transformer.forward): x fp32 [B, D]
            y = self.decode_with_ops(x, cos, sin, rows)
            if y is not None:
                return y
            dt = self.input_layernorm.weight.dtype  # a weight they do not serve (LoRA, ...): this layer in PyTorch
            cos, sin = cos.to(dt)[:, None, None], sin.to(dt)[:, None, None]
            return self.forward(x[:, None].to(dt), cos, sin, mask, is_causal, cache)[:, 0].float()
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, qscale)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_with_ops(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: tuple,
                        run=ops) -> torch.Tensor | None:  # noqa: ANN001 - the ops module or an ops.Graph
        """This block's decode step on `tianying.ops` (x fp32 [B, D], cos / signed sin fp32 [B or 1, head_dim]),
        the same formulas as `forward`, called now (`run` = tianying.ops) or recorded (an `ops.Graph`); None
        when an op does not serve one of its weights."""
        a, m = self.self_attn, self.mlp
        am, mm = a._modules, m._modules  # (nn.Module.__getattr__ costs more than the rest of a lookup)
        q, k, v, o = (op_weight(am[n]) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        g, u, d = (op_weight(mm[n]) for n in ("gate_proj", "up_proj", "down_proj"))
        if q is None or k is None or v is None or o is None or g is None or u is None or d is None:
            return None
        n1, n2 = self._modules["input_layernorm"], self._modules["post_attention_layernorm"]
        w1, w2 = n1._parameters["weight"], n2._parameters["weight"]
        qkv = run.linear(x, q, k, v, norm=w1 if w1.dtype in ops.NORM_DTYPES else w1.float(), eps=n1.eps)
        x = run.attend_decode(qkv, (a.n_head, a.n_kv_head, a.head_dim), (q.width, q.width + k.width), cos, sin,
                              rows[0], rows[1], a.layer_idx, rows[2], o=o, add=x)
        if x.shape[1] != o.N:
            x = x[:, :o.N]
        y = run.mlp(x, g, u, d, w2 if w2.dtype in ops.NORM_DTYPES else w2.float(), n2.eps, add=x)
        return y if d.width == d.N else y[:, :d.N]


def project(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x); for a plain bias-free `nn.Linear` given several rows on the CPU with no autograd, no hook, no
    autocast and no compiler watching, the same product on `tianying.ops.linear` where that beats PyTorch's
    GEMM (`ops.dense_gemm`: prefill, batched forwards, evaluation)."""
    if (type(m) is nn.Linear and x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() > x.shape[-1]
            and not (m._forward_hooks or m._forward_pre_hooks or _global_hooks())
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")):
        w = m._parameters["weight"]
        if m._parameters["bias"] is None and x.dtype is w.dtype and ops.dense_gemm(w.dtype, x.numel() // w.shape[1]):
            op = ops.dense_weight_of(m)
            if op is not None:
                x2 = x.reshape(-1, op.proj.K)
                y = ops.linear(x2 if x2.dtype is torch.float32 else x2.float(), op)
                return y.to(x.dtype).view(*x.shape[:-1], op.N)
    return m(x)


def _global_hooks() -> bool:
    mm = torch.nn.modules.module
    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks)


def op_weight(m: nn.Module) -> ops.Weight | None:
    """A projection as a `tianying.ops.linear` operand: a bias-free `nn.Linear` with a dense CPU weight, or a
    layer that offers one (`QuantLinear.native_weight`); None otherwise."""
    if type(m) is nn.Linear:
        return ops.dense_weight_of(m) if m._parameters["bias"] is None else None
    f = getattr(m, "native_weight", None)
    return f() if f is not None else None


# ------------------------------------------------------------------ decode graphs
_EPOCH = [0]  # bumped whenever any module gains or replaces a submodule, parameter or buffer
_GRAPH_OWNERS: weakref.WeakSet = weakref.WeakSet()  # models holding decode graphs (dropped at each bump)
_HOOKED = [False]


def _structure_changed(*_args) -> None:  # noqa: ANN002 - a global registration hook (must return None)
    _EPOCH[0] += 1
    for m in list(_GRAPH_OWNERS):
        m._decode_graphs.clear()  # (releases the replaced tensors now, not at the next decode step)
    _GRAPH_OWNERS.clear()


def _watch_structure() -> None:
    if not _HOOKED[0]:
        from torch.nn.modules import module as mm
        mm.register_module_module_registration_hook(_structure_changed)
        mm.register_module_parameter_registration_hook(_structure_changed)
        mm.register_module_buffer_registration_hook(_structure_changed)
        _HOOKED[0] = True


class _Snapshot:
    """What a decode graph read of a model, to tell whether it still holds: the structure epoch, every tensor's
    address, and the version of those the graph copied (fp16 norms widened to fp32; the weights and fp32/bf16
    norms it reads in place). Alone, it records that a step was not servable with these weights."""

    def __init__(self, model: Transformer) -> None:
        self.tensors = [*model.parameters(), *model.buffers()]
        self.epoch, self.state = _EPOCH[0], self._state()

    def _state(self) -> tuple:
        ts = self.tensors
        return (*map(torch.Tensor.data_ptr, ts), *(t._version for t in ts if t.dtype is torch.float16))

    def valid(self) -> bool:
        return self.epoch == _EPOCH[0] and self._state() == self.state


class DecodeGraph(_Snapshot):
    """A decode step of one model (every layer's `decode_with_ops`, then the head) recorded into an `ops.Graph`
    for one batch size and one set of KV-cache rows, and replayed with new inputs: the Python of ~100 op calls
    per step, their argument checks and their OpenMP fork/joins become one C call.

    It is replayed only while what it read is unchanged: the model's structure (a module, parameter or buffer
    registered anywhere drops every graph: `_structure_changed`), each parameter's and buffer's address
    (`.data` swaps, `.to()`; and the version of the few it copies), no forward hooks on the
    blocks (they would not run), and the same cache rows at the same addresses (`DecodeGraphs.get`). The graph
    reads the weights in place, so in-place updates (an optimizer step between generations) need no new one."""

    def __init__(self, model: Transformer, rows: tuple) -> None:
        cfg = model.config
        B, hd = rows[0].shape[1], cfg.head_dim
        self.x = torch.empty(B, cfg.hidden_size)
        self.cos, self.sin = torch.empty(B, hd), torch.empty(B, hd)
        self.pos = torch.empty(B, dtype=torch.int64)
        self.graph = ops.Graph()
        g_rows = (rows[0], rows[1], self.pos)
        x = self.x
        for layer in model.model.layers:
            x = layer.decode_with_ops(x, self.cos, self.sin, g_rows, run=self.graph)
            if x is None:
                raise LookupError("a layer the ops do not serve")
        self.out = model._head_with_ops(x, run=self.graph)
        if self.out is None:
            raise LookupError("a head the ops do not serve")
        super().__init__(model)

    def replay(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.cos.copy_(cos.expand_as(self.cos))
        self.sin.copy_(sin.expand_as(self.sin))
        self.pos.copy_(pos)
        self.graph.run()
        return self.out.clone()  # (the buffer is the next replay's)


class DecodeGraphs(dict):
    """A model's decode graphs by batch size and cache rows (a few: each batch size the engine steps with)."""

    MAX = 8

    def get(self, model: Transformer, rows: tuple) -> DecodeGraph | None:
        k, v = rows[0], rows[1]
        if _global_hooks() or any(b._forward_pre_hooks or b._forward_hooks for b in model.model.layers):
            return None
        key = (k.data_ptr(), v.data_ptr(), k.shape, k.stride(), k.dtype)
        entry = super().get(key)
        if entry is not None and entry.valid():
            return entry if isinstance(entry, DecodeGraph) else None  # (a bare snapshot: not servable)
        _watch_structure()
        try:
            entry = DecodeGraph(model, rows)
        except (LookupError, ValueError):  # a layer or the head the ops do not serve
            entry = _Snapshot(model)
        self.pop(key, None)
        if len(self) >= self.MAX:
            del self[next(iter(self))]
        self[key] = entry
        _GRAPH_OWNERS.add(model)
        return entry if isinstance(entry, DecodeGraph) else None

    def __deepcopy__(self, memo: dict) -> DecodeGraphs:  # (a copy records its own)
        return DecodeGraphs()

    def __reduce__(self) -> tuple:
        return (DecodeGraphs, ())


class Decoder(nn.Module):
    """Mirrors transformers' `LlamaModel` so that parameter names match (`model.layers.N...`)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:  # other LLaMA-family models (not Aquila): the head is the embedding table
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.native_ops = True  # decode steps on tianying.ops where they serve the weights (False: PyTorch only)
        self._decode_graphs = DecodeGraphs()
        self._rope_table: tuple | None = None  # (len, device, dtype, cos, sin) for unscaled/linear RoPE

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activations' (and so the KV cache's) dtype: the norms' (the embedding table may be stored narrower)."""
        return self.model.norm.weight.dtype

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """normal(0, initializer_range) on every Linear/Embedding weight, ones on norms (as HF/FlagAI)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    # ------------------------------------------------------------------ rotary tables
    def rope(self, positions: torch.Tensor | None, start: int, T: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B or 1, T, D] for `positions` [B, T], or for start + arange(T) when positions is None.

        Every kind but dynamic reads a table built once per device/dtype; the common case (no positions
        given, as in every unpadded decode step) is a slice of it, with no per-step index arithmetic.
        """
        cfg = self.config
        scaling = cfg.rope_scaling
        if scaling and scaling["type"] == "dynamic":
            # length-dependent variants are recomputed per forward, as transformers does
            if positions is None:
                positions = torch.arange(start, start + T, device=device)[None]
            seq_len = int(positions.max()) + 1
            return rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, scaling, cfg.max_position_embeddings,
                                seq_len=seq_len, dtype=dtype)
        need = start + T if positions is None else int(positions.max()) + 1
        t = self._rope_table
        if t is None or t[0] < need or t[1] != device or t[2] != dtype:
            n = max(need, cfg.max_position_embeddings)
            with torch.inference_mode(False):  # a table built while generating must still serve training
                cos, sin = rope_cos_sin(torch.arange(n, device=device), cfg.head_dim, cfg.rope_theta,
                                        scaling, cfg.max_position_embeddings, seq_len=n, dtype=dtype)
            t = self._rope_table = (n, device, dtype, cos, sin)
        if positions is None:
            return t[3][None, start:start + T], t[4][None, start:start + T]
        return t[3][positions], t[4][positions]

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | CacheRows | None = None,
                positions: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, last_only: bool = False,
                hidden_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`); with `hidden_only`, the normed final hidden states
        [B, T, d] instead (training applies the head inside its loss, tianying.train.loss).

        Args:
            input_ids: [B, T] token ids.
            cache: a KVCache (or rows of one) to append the T tokens to; None for a plain forward.
            positions: [B, T] rotary positions (default: each row's cache length + arange(T), or arange(T)).
            pad_mask: [B, T] bool, False where a token is padding (never attended to); plain forwards only.
            doc_ids: [B, T] ints, one per packed sample of a row (plain forwards only): a token attends only
                to earlier tokens of its own sample (a block-diagonal causal mask) and, unless `positions` is
                given, positions restart at 0 with each sample, so a packed row computes what the samples
                would alone.
        """
        B, T = input_ids.shape
        device = input_ids.device
        cfg = self.config
        step = None
        start = 0
        if cache is not None:
            if pad_mask is not None or doc_ids is not None:
                raise ValueError("pad_mask/doc_ids are for plain forwards; cached rows have their own lengths")
            step = cache.begin(T, device)
            if positions is None:
                positions, start = step.positions, step.start or 0
            mask, is_causal = step.mask, step.is_causal
        else:
            mask, is_causal = self._plain_mask(pad_mask, T, device, doc_ids)
            if doc_ids is not None and positions is None:
                positions = sample_positions(doc_ids)
        qscale = None
        if cfg.logn_attention:
            pos = positions if positions is not None else torch.arange(start, start + T, device=device)[None]
            qscale = logn_scale(pos, cfg.logn_length or cfg.max_position_embeddings)[:, None, :, None]
        x = self.model.embed_tokens(input_ids)
        rows = None
        if (step is not None and T == 1 and qscale is None and self.native_ops and device.type == "cpu"
                and not hidden_only and not torch.is_grad_enabled() and ops.enabled()):
            rows = step.rows_for_ops()
        if rows is not None:  # a decode step on tianying.ops: fp32 activations [B, D] throughout
            cos, sin = rotation_tables(*self.rope(positions, start, T, torch.float32, device))
            x, cos, sin = x[:, 0].float(), cos[:, 0, 0], sin[:, 0, 0]
            graph = self._decode_graphs.get(self, rows)
            if graph is not None:
                logits = graph.replay(x, cos, sin, rows[2])
            else:  # layer by layer (a layer the ops do not serve runs in PyTorch)
                for layer in self.model.layers:
                    x = layer(x, cos, sin, mask, is_causal, step, None, rows)
                logits = self._head_with_ops(x)
            cache.end(step)
            return logits[:, None]
        if x.dtype != self.compute_dtype:  # embeddings stored narrower than the compute dtype
            x = x.to(self.compute_dtype)
        cos, sin = rotation_tables(*self.rope(positions, start, T, x.dtype, device))
        if qscale is not None:
            qscale = qscale.to(x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, is_causal, step, qscale, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, step, qscale)
        if step is not None:
            cache.end(step)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if hidden_only else project(self.lm_head, x)

    def _head_with_ops(self, x: torch.Tensor, run=ops) -> torch.Tensor | None:  # noqa: ANN001 - see decode_with_ops
        """Logits [B, V] of fp32 hidden states [B, D] (final RMSNorm fused into the head's product); recorded
        into `run` when it is an `ops.Graph` (None there when the ops do not serve the head)."""
        norm, w = self.model.norm, op_weight(self.lm_head)
        if w is None:
            return None if run is not ops else self.lm_head(norm(x.to(self.compute_dtype)))
        nw = norm.weight if norm.weight.dtype in ops.NORM_DTYPES else norm.weight.float()
        return run.linear(x, w, norm=nw, eps=norm.eps)[:, :self.config.vocab_size]

    def _plain_mask(self, pad_mask: torch.Tensor | None, T: int, device: torch.device,
                    doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
        """Causal (and sliding-window) mask of a forward without a cache; padded keys are never seen, and with
        `doc_ids` neither are other samples' (block-diagonal: one boolean mask, which SDPA runs fused on CPU and
        GPU alike)."""
        W, S = self.config.attention_window, self.config.attention_sinks
        if not W and pad_mask is None and doc_ids is None:
            return None, T > 1
        q = torch.arange(T, device=device)[:, None]
        k = torch.arange(T, device=device)[None, :]
        mask = k <= q
        if W:
            mask = mask & ((k > q - W) | (k < S))
        mask = mask[None, None]
        if pad_mask is not None:
            # a padded query may see nothing; letting it see itself avoids NaN rows (its output is unused)
            mask = (mask & pad_mask[:, None, None, :]) | (k == q)[None, None]
        if doc_ids is not None:
            mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        return mask, False


def sample_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] positions that restart at 0 wherever `doc_ids` changes along a row (a packed row's samples)."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, :-1] predict labels[:, 1:], mean over non-ignored (fp32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=ignore_index)


def build_model(cfg: Config, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                init: bool = True, seed: int | None = None) -> Transformer:
    """A freshly initialised model (init=False leaves it on the meta device for a checkpoint to fill)."""
    if not init:
        with torch.device("meta"), _skip_default_init():
            return Transformer(cfg)
    with torch.device(device), _skip_default_init():
        model = Transformer(cfg)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(gen)
    return model.to(dtype)


@contextmanager
def _skip_default_init():
    """nn.Linear/nn.Embedding initialise themselves on construction; we overwrite (init_weights) or load every
    weight anyway. Skipping it saves the work, and on the meta device it avoids a first-call import of torch's
    decomposition machinery (measured: 7.5 s → 0.07 s for the first meta build on this 2-core machine)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def set_config(model: Transformer, cfg: Config) -> None:
    """Gives a built model new position settings (RoPE scaling, LogN, window): the cached rotary table goes."""
    model.config = cfg
    model._rope_table = None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

