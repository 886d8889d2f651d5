"""The Aquila transformer, one file.

Aquila / Aquila2 is a LLaMA-shaped decoder (seed-spec §1.1):
- pre-norm blocks: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x)); RMSNorm variance in fp32
- rotary position embeddings in the rotate-half layout, angles computed in fp32 (tianying.rope), with
  optional `rope_scaling` (linear position interpolation for the released 16K chat models)
- grouped-query attention (n_kv_head ≤ n_head; KV heads shared by consecutive query heads) via SDPA
- SwiGLU MLP: down(silu(gate(x)) · up(x))
- no biases anywhere; untied input embedding and LM head; no embedding scaling
- long-context switches, all off by default (issue 8; not in Aquila's code): RoPE scaling kinds (tianying.rope),
  LogN query scaling beyond the training length, sliding-window attention with optional sink tokens and a
  ring-buffer `WindowKVCache` whose memory stays flat however long generation runs

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`) so a
transformers state dict loads with no renaming. Generation uses a preallocated `KVCache`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    """Preallocated keys/values for all layers: [n_layer, B, n_kv_head, max_len, head_dim].

    `pos` is the number of filled positions (shared by the batch; left padding makes rows ragged, and
    `valid` marks which cached positions are real tokens).
    """

    def __init__(self, cfg: Config, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        # empty, not zeros: only written columns [:pos] are ever read, and untouched pages cost no memory
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views: one op per write/read
        self.valid: torch.Tensor | None = None  # [B, max_len] bool once any padding was seen
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes k, v [B, n_kv_head, T, D] in place at `pos`; returns the filled [B, n_kv_head, pos+T, D]."""
        T = k.shape[2]
        kc, vc = self._layers[layer]
        kc.narrow(2, self.pos, T).copy_(k)
        vc.narrow(2, self.pos, T).copy_(v)
        return kc.narrow(2, 0, self.pos + T), vc.narrow(2, 0, self.pos + T)

    def reset(self) -> None:
        self.pos = 0
        self.valid = None


class WindowKVCache:
    """Keys/values for sliding-window attention: S sink slots, then a ring of W slots; memory never grows.

    Position j (0-based, counted over the whole sequence including left padding) lives in slot j if j < S,
    else in slot S + (j − S) mod W, so the ring always holds the W most recent non-sink positions: exactly the
    keys a window-W query can still see. Keys are cached after RoPE, so a slot's order does not matter.
    A one-token step writes first and then attends to every filled slot (no mask); a chunk of T > 1 tokens
    attends to [filled slots, its own keys] under an explicit mask and then writes its last entries, so a
    chunk may be longer than the window. Same protocol as KVCache (`pos`, `max_len`, `valid`, `update`).
    """

    def __init__(self, cfg: Config, batch_size: int, window: int, sinks: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.window, self.sinks, self.capacity = int(window), int(sinks), int(window) + int(sinks)
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, self.capacity, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self.valid: torch.Tensor | None = None  # [B, capacity] per slot, once any padding was seen
        self.max_len = 2**62  # no length limit: that is the point
        self.pos = 0
        self._plan: tuple | None = None

    def slot(self, j: torch.Tensor) -> torch.Tensor:
        """Slot of absolute positions `j`."""
        S = self.sinks
        return torch.where(j < S, j, S + (j - S) % self.window)

    def held_positions(self, n: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Absolute positions in slots 0 … filled−1 after `n` (default `pos`) tokens."""
        n = self.pos if n is None else n
        S, W = self.sinks, self.window
        sinks = torch.arange(min(n, S), device=device)
        m = max(n - S, 0)  # non-sink tokens seen
        r = torch.arange(min(m, W), device=device)
        return torch.cat([sinks, S + r + W * torch.div(m - 1 - r, W, rounding_mode="floor")])

    def prepare(self, T: int, device: torch.device, key_positions: bool = True) -> torch.Tensor | None:
        """Plans the writes of the next T tokens; returns the absolute positions of the keys `update` returns."""
        start = self.pos
        if T == 1 and not key_positions:  # the common decode step: plain ints, no tensor ops
            S = self.sinks
            self._plan = (1, start if start < S else S + (start - S) % self.window, None)
            return None
        new = torch.arange(start, start + T, device=device)
        slots = self.slot(new)
        keep = torch.zeros(T, dtype=torch.bool, device=device)
        if T == 1:
            keep[0] = True
        else:  # only the last write to each slot survives
            last = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
            last.scatter_reduce_(0, slots, torch.arange(T, device=device), reduce="amax")
            keep[last[last >= 0]] = True
        self._plan = (T, slots[keep], keep.nonzero().flatten())
        if T == 1:
            return self.held_positions(start + 1, device)
        return torch.cat([self.held_positions(start, device), new])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, n_kv_head, T, D] → the keys/values to attend to, in `prepare`'s order."""
        T, slots, idx = self._plan
        kc, vc = self._layers[layer]
        if T == 1:
            s = slots if isinstance(slots, int) else int(slots[0])
            kc.narrow(2, s, 1).copy_(k)
            vc.narrow(2, s, 1).copy_(v)
            n = min(self.pos + 1, self.capacity)
            return kc.narrow(2, 0, n), vc.narrow(2, 0, n)
        n = min(self.pos, self.capacity)
        k_all = torch.cat([kc.narrow(2, 0, n), k], dim=2)
        v_all = torch.cat([vc.narrow(2, 0, n), v], dim=2)
        kc.index_copy_(2, slots, k.index_select(2, idx))
        vc.index_copy_(2, slots, v.index_select(2, idx))
        return k_all, v_all

    def memory_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self) -> None:
        self.pos = 0
        self.valid = None


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
                is_causal: bool, cache: KVCache | None, qscale: torch.Tensor | None = None) -> torch.Tensor:
        """cos/sin from `rope.rotation_tables`; `qscale` [B or 1, 1, T, 1] multiplies the rotated queries (LogN
        scaling); None leaves them."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
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
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache, qscale=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, qscale)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        # optional faster decode step (tianying.quantize.decode): (x, cos, sin, cache) → x after all layers, or
        # None when it does not handle this step; only consulted for one unpadded token per row
        self.fast_decode = None
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

    # ------------------------------------------------------------------ decode layout
    def _use_decode_layout(self) -> None:
        """Stores an fp32 CPU LM head column-major, once, when generation starts.

        A decode step multiplies one activation row by each weight (a GEMV), and for W [out, in] with out ≫ in
        MKL streams Wᵀ-contiguous storage much faster than row-major. Measured on this 2-core AVX2 machine
        (loaded): LM head 100008×256 2.8 → 8.2 GB/s, 100008×768 4.4 → 9.1 GB/s; the head is 89% of the bytes
        a "tiny" step reads. bf16 loses (2.2 → 0.5 GB/s) and so stays. MLP gate/up would gain less
        (2048×768: 4.1 → 5.6) and are left alone: layer weights may be views that other code manages (offloaded
        layers stream through shared slots). Values, shape and name stay (state_dict, load_state_dict and
        optimizers are unaffected); only the strides differ, and with them the summation order (~1e-6).
        """
        head = self.lm_head
        if self.training or type(head) is not nn.Linear:  # a swapped head (quantized, LoRA) has its own layout
            return
        w = head.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or w.stride(1) != 1 or w._base is not None:
            return
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, so training may follow
            w.data = w.data.t().contiguous().t()

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`).

        Args:
            input_ids: [B, T] token ids.
            cache: a KVCache to append to (its `pos` advances by T); None for a plain forward.
            positions: [B, T] rotary positions (default: cache.pos + arange(T)); left-padded batches pass
                their own so every row starts at position 0.
            pad_mask: [B, T] bool, False where a token is padding (it is never attended to).
        """
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked for {start + T}")
        device = input_ids.device
        if cache is not None:  # generating
            self._use_decode_layout()
        cfg = self.config
        qscale = None
        if cfg.logn_attention:
            pos = positions if positions is not None else torch.arange(start, start + T, device=device)[None]
            qscale = logn_scale(pos, cfg.logn_length or cfg.max_position_embeddings)[:, None, :, None]
        if cfg.attention_window:
            mask, is_causal = self._window_mask(cache, pad_mask, start, T, device)
            return self._run(input_ids, mask, is_causal, cache, positions, start, T, qscale, last_only)

        # key validity: which of the (cached + new) positions are real tokens
        valid = None
        if cache is not None:
            if pad_mask is not None and cache.valid is None:
                cache.valid = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
            if cache.valid is not None:
                cache.valid[:, start:start + T] = True if pad_mask is None else pad_mask
                valid = cache.valid[:, :start + T]
        elif pad_mask is not None:
            valid = pad_mask

        # an unpadded decode step (T = 1, no valid mask) needs no mask at all: the query sees every key
        mask, is_causal = None, False
        if valid is None and start == 0:
            is_causal = T > 1
        elif valid is not None or T > 1:
            S = start + T
            q_idx = torch.arange(start, S, device=device)[:, None]
            k_idx = torch.arange(S, device=device)[None, :]
            mask = (k_idx <= q_idx)[None, None]  # [1, 1, T, S]
            if valid is not None:
                # a padded query may see nothing; letting it see itself avoids NaN rows (its output is unused)
                mask = (mask & valid[:, None, None, :]) | (k_idx == q_idx)[None, None]

        return self._run(input_ids, mask, is_causal, cache, positions, start, T, qscale, last_only)

    def _run(self, input_ids: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None,
             positions: torch.Tensor | None, start: int, T: int, qscale: torch.Tensor | None,
             last_only: bool) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if x.dtype != self.compute_dtype:  # embeddings stored narrower than the compute dtype
            x = x.to(self.compute_dtype)
        cos, sin = rotation_tables(*self.rope(positions, start, T, x.dtype, input_ids.device))
        if qscale is not None:
            qscale = qscale.to(x.dtype)
        fast = None
        if (self.fast_decode is not None and T == 1 and mask is None and not is_causal and qscale is None
                and positions is None and type(cache) is KVCache and not self.training
                and not self.config.attention_window):
            fast = self.fast_decode(x, cos, sin, cache)
        for layer in self.model.layers if fast is None else ():
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, is_causal, cache, qscale, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, is_causal, cache, qscale)
        if fast is not None:
            x = fast
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def _window_mask(self, cache: KVCache | WindowKVCache | None, pad_mask: torch.Tensor | None, start: int,
                     T: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """Sliding-window mask [B or 1, 1, T, keys]: key j is visible to query i iff j ≤ i and (j > i − W or j < S).

        i, j are absolute sequence indices (cache columns), so with left padding the window counts pad
        columns too; they are invalid keys, and a row's window of real tokens is the same as unpadded.
        """
        cfg = self.config
        W, S = cfg.attention_window, cfg.attention_sinks
        q_idx = torch.arange(start, start + T, device=device)
        ring = isinstance(cache, WindowKVCache)
        if ring:
            if (cache.window, cache.sinks) != (W, S):
                raise ValueError(f"WindowKVCache(window={cache.window}, sinks={cache.sinks}) does not match the "
                                 f"config's attention_window={W}, attention_sinks={S}")
            if T == 1 and pad_mask is None and cache.valid is None:
                cache.prepare(1, device, key_positions=False)
                return None, False  # every held key is in the window
            k_idx = cache.prepare(T, device)
        else:
            k_idx = torch.arange(start + T, device=device)
        valid = None
        if cache is not None:
            if pad_mask is not None and cache.valid is None:
                cache.valid = torch.ones(pad_mask.shape[0], cache.capacity if ring else cache.max_len,
                                         dtype=torch.bool, device=device)
            if cache.valid is not None:
                new = True if pad_mask is None else pad_mask
                if ring:
                    slots = cache.slot(q_idx)
                    held = min(start, cache.capacity)
                    if T == 1:
                        cache.valid[:, slots] = new
                        valid = cache.valid[:, :min(start + 1, cache.capacity)]
                    else:
                        chunk = torch.ones(cache.valid.shape[0], T, dtype=torch.bool, device=device)
                        chunk[:] = new
                        valid = torch.cat([cache.valid[:, :held], chunk], dim=1)
                        _, kept_slots, kept = cache._plan
                        cache.valid[:, kept_slots] = chunk[:, kept]
                else:
                    cache.valid[:, start:start + T] = new
                    valid = cache.valid[:, :start + T]
        elif pad_mask is not None:
            valid = pad_mask
        q, k = q_idx[:, None], k_idx[None, :]
        mask = (k <= q) & ((k > q - W) | (k < S))
        mask = mask[None, None]
        if valid is not None:
            mask = (mask & valid[:, None, None, :]) | (k == q)[None, None]
        return mask, False


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

