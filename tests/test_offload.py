"""Memory budget: layers stream from disk, outputs equal the unlimited model's, peak RSS stays near the limit.

Kept fast (a few seconds each on an idle 2-core machine): the RSS test decodes 4 tokens by default (12 in its
slow variant, `-m slow`); the quantized comparison uses an 8-layer, 128-wide model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tianying.config import Config
from tianying.model import KVCache, build_model

# 16 layers × 4 MiB (fp32) + 1 MiB embeddings/head ≈ 65 MiB of weights, ~3× the 22 MiB limit
CFG = dict(vocab_size=512, hidden_size=256, n_layer=16, n_head=4, n_kv_head=4, intermediate_size=1024,
           max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
LIMIT = "22MiB"
SEED = 2  # weights whose 4-token greedy decode is not a constant
# 8 layers × ~170 KiB int8 + 0.5 MiB embeddings/head (fp32): a 1.3 MiB limit streams most layers
SMALL = dict(CFG, hidden_size=128, n_layer=8, intermediate_size=256)


def greedy(model: torch.nn.Module, cfg: Config, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, list[int]]:
    """Prompt logits and n greedy tokens with a KV cache (the decode loop `generate` runs)."""
    cache = KVCache(cfg, 1, prompt.shape[1] + n, torch.float32, "cpu")
    with torch.no_grad():
        logits = model(prompt, cache=cache)
        out, tok = [], logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n):
            out.append(int(tok))
            tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
    return logits, out


def _save(path, **cfg_kw):  # noqa: ANN001, ANN202
    from tianying.checkpoint import save_hf

    cfg = Config(name="offload-test", **cfg_kw)
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(SEED)  # not the global RNG: other test files must not change the weights
    with torch.no_grad():  # unit-scale weights so that greedy decoding is not a constant
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5 if "embed" not in str(p.shape) else 1.0, generator=g)
    save_hf(model, cfg, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("offload") / "ckpt", **CFG)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("offload") / "small", **SMALL)


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from tianying.model import KVCache
    from tianying.quantize.offload import load_with_memory_limit

    def greedy(model, cfg, prompt, n):  # test_offload.greedy, inlined: importing pytest costs seconds
        cache = KVCache(cfg, 1, prompt.shape[1] + n, torch.float32, "cpu")
        with torch.no_grad():
            logits = model(prompt, cache=cache)
            out, tok = [], logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(n):
                out.append(int(tok))
                tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        return logits, out

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    prompt = torch.arange(3, 19)[None]
    # one-time library costs (~70 MiB the first time torch builds a module on the meta device, kernel
    # initialisation on the first forward) are not the model's: pay them on a 64-wide model first
    from tianying.config import Config
    from tianying.model import build_model
    tiny = Config.from_name("test-mha")
    greedy(build_model(tiny, init=False).to_empty(device="cpu"), tiny, prompt, 2)
    del tiny
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    model, cfg = load_with_memory_limit(sys.argv[1], sys.argv[2])
    logits, ids = greedy(model, cfg, prompt, int(sys.argv[5]))
    peak = status("VmHWM:") - base
    torch.save(logits, sys.argv[4])
    print(json.dumps({"peak": peak, "ids": ids, "streamed": model.memory_plan.streamed,
                      "reads": model._layer_streamer.reads}))
""")


@pytest.mark.parametrize("n_new", [4, pytest.param(12, marks=pytest.mark.slow)])
def test_memory_limited_generation_equals_unlimited_and_stays_under_budget(ckpt, tmp_path, n_new: int) -> None:
    from pathlib import Path

    from tianying.checkpoint import load_model
    from tianying.quantize.offload import parse_memory

    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), LIMIT, str(Path(__file__).parent),
                          str(tmp_path / "logits.pt"), str(n_new)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert "memory plan (limit 22.0 MiB)" in out.stderr and "slower" in out.stderr
    limit = parse_memory(LIMIT)
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert weights > 2.8 * limit
    assert len(res["streamed"]) >= 12 and res["reads"] >= (n_new + 1) * len(res["streamed"]) - 1
    assert res["peak"] <= 1.10 * limit, f"peak RSS grew by {res['peak'] / 2**20:.1f} MiB"

    model, cfg = load_model(ckpt)
    logits, ids = greedy(model, cfg, torch.arange(3, 19)[None], n_new)
    assert res["ids"] == ids and len(set(ids)) > 1
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits)


def test_plan_and_errors() -> None:
    from tianying.quantize import QuantizeError
    from tianying.quantize.offload import make_plan

    mib = 2**20
    p = make_plan(22 * mib, 1 * mib, 4 * mib, 16)
    assert len(p.resident) == 2 and len(p.streamed) == 14 and p.resident_bytes <= 22 * mib
    assert set(p.resident) | set(p.streamed) == set(range(16))
    assert make_plan(100 * mib, 1 * mib, 4 * mib, 16).streamed == []
    with pytest.raises(QuantizeError, match="too small"):
        make_plan(8 * mib, 1 * mib, 4 * mib, 16)


def test_memory_limit_with_quantization_matches_quantize_on_load(small_ckpt) -> None:
    from tianying.checkpoint import load_model
    from tianying.quantize import apply_quantization
    from tianying.quantize.offload import load_with_memory_limit

    with pytest.warns(UserWarning, match="stream"):
        model, cfg = load_with_memory_limit(small_ckpt, "1300KiB", quantize="int8", verbose=False)
    assert len(model.memory_plan.streamed) >= 5 and model.memory_plan.layer_bytes < 200 * 2**10
    ref, _ = load_model(small_ckpt)
    apply_quantization(ref, "int8")
    prompt = torch.arange(3, 19)[None]
    a, ids_a = greedy(model, cfg, prompt, 3)
    b, ids_b = greedy(ref, cfg, prompt, 3)
    assert torch.equal(a, b) and ids_a == ids_b
