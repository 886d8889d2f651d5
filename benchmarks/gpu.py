"""The GPU check (issue 16), prepared to run in one short call on a lent CUDA machine (< 10 minutes):

1. the CUDA-relevant tests (`pytest -k "cuda or gpu or device"`), if a checkout with tests is at hand;
2. bf16 training MFU of a ~1B-parameter Aquila-shaped model: tianying's model, SDPA (flash) attention, fused
   AdamW, `torch.compile`, next-token loss, `--steps` timed steps after warm-up; MFU = (6·N + 12·L·d·T) FLOPs
   per token × tokens/s ÷ the GPU's dense bf16 peak;
3. batch-1 greedy decode through the engine in bf16, as a fraction of the HBM bandwidth bound (every weight byte
   read once per token).

On a machine without CUDA it runs the same code on a tiny config on the CPU, to prove the script works, and says
that no GPU numbers were measured. Prints a table and, as its last line, one JSON document.

    python benchmarks/gpu.py                 # what a session with a GPU runs
    python benchmarks/gpu.py --skip-tests --steps 5
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 tensor-core peak (TFLOP/s) and HBM bandwidth (TB/s) by device name
PEAKS = {"H200": (989.0, 4.8), "H100": (989.0, 3.35), "A100": (312.0, 2.0), "L40S": (362.0, 0.864),
         "A10G": (125.0, 0.6), "4090": (165.0, 1.0)}


def peak_of(name: str) -> tuple[float, float] | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def aquila_1b():  # noqa: ANN201 - a tianying Config
    from tianying.config import Config

    # Aquila's shape scaled to ~1.1B parameters: its 100,008-token vocabulary, SwiGLU, untied head
    return Config.from_name("demo").replace(name="aquila-1b", vocab_size=100008, hidden_size=2048, n_layer=16,
                                           n_head=16, n_kv_head=16, intermediate_size=5632,
                                           max_position_embeddings=2048)


def tiny():  # noqa: ANN201
    from tianying.config import Config

    return Config.from_name("test-gqa").replace(max_position_embeddings=256)


def train_mfu(cfg, device: str, steps: int, batch: int, seq: int, compile_: bool) -> dict:  # noqa: ANN001
    from tianying.model import build_model, causal_lm_loss

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(cfg, device=device, dtype=dtype, seed=0).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    fwd = torch.compile(model) if compile_ else model
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=gen)

    def step() -> float:
        loss = causal_lm_loss(fwd(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    for _ in range(2):  # compile and allocator warm-up
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    tok_s = batch * seq * steps / dt
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * cfg.hidden_size * seq
    out = {"params": n_params, "tokens_per_s": round(tok_s, 1), "tflops": round(tok_s * flops_per_token / 1e12, 2),
           "warmup_s": round(warm, 1), "loss": round(loss, 4), "batch": batch, "seq": seq, "compile": compile_}
    if device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def decode_fraction(cfg, device: str, tokens: int) -> dict:  # noqa: ANN001
    from tianying.engine import Engine
    from tianying.generate import SamplingParams
    from tianying.model import build_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(cfg, device=device, dtype=dtype, seed=0).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = Engine(model, max_batch=1, max_len=64 + tokens, prefix_cache_bytes=0)
    prompt = list(range(3, 35))
    engine.generate_ids([prompt], SamplingParams(max_new_tokens=4))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    n = len(engine.generate_ids([prompt], SamplingParams(max_new_tokens=tokens, stop_token_ids=()))[0])
    if device == "cuda":
        torch.cuda.synchronize()
    tok_s = n / (time.perf_counter() - t)
    return {"tokens_per_s": round(tok_s, 1), "weight_gb": round(weight_bytes / 1e9, 3),
            "gb_per_s": round(weight_bytes * tok_s / 1e9, 1)}


def run_tests() -> dict:
    if not (ROOT / "tests").is_dir():
        return {"ran": False, "why": "no tests/ next to this script"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=-m 'not slow'", "-x", "-k",
                        "cuda or gpu or device", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=420)
    tail = [ln for ln in p.stdout.splitlines() if ln.strip()][-1:] or ["(no output)"]
    return {"ran": True, "rc": p.returncode, "summary": tail[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed training steps (default 10)")
    p.add_argument("--batch", type=int, default=8, help="training rows per step (default 8)")
    p.add_argument("--seq", type=int, default=2048, help="training sequence length (default 2048)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    a = p.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        cfg, batch, seq = aquila_1b(), a.batch, a.seq
    else:
        print("no CUDA device here: running the CPU-safe parts on a tiny config (no GPU numbers measured)")
        cfg, batch, seq = tiny(), 2, 64
    res: dict = {"benchmark": "gpu", "device": name, "torch": torch.__version__, "config": cfg.name}
    if not a.skip_tests:
        res["tests"] = run_tests()
        print(f"tests: {res['tests']}")
    res["train"] = train_mfu(cfg, device, a.steps if cuda else 2, batch, seq, compile_=cuda and not a.no_compile)
    res["decode"] = decode_fraction(cfg, device, a.decode_tokens if cuda else 8)
    peak = peak_of(name) if cuda else None
    if peak:
        res["train"]["mfu"] = round(res["train"]["tflops"] / peak[0], 3)
        res["decode"]["fraction_of_hbm"] = round(res["decode"]["gb_per_s"] / (peak[1] * 1000), 3)
    tr, de = res["train"], res["decode"]
    print(f"{'what':<34} {'value':>14}   goal")
    print(f"{'train tokens/s (bf16)':<34} {tr['tokens_per_s']:>14.1f}")
    mfu = f"{tr['mfu'] * 100:.1f}%" if "mfu" in tr else "n/a"
    print(f"{'train MFU':<34} {mfu:>14}   >= 45%")
    print(f"{'decode tokens/s (batch 1)':<34} {de['tokens_per_s']:>14.1f}")
    frac = f"{de['fraction_of_hbm'] * 100:.1f}%" if "fraction_of_hbm" in de else "n/a"
    print(f"{'decode, fraction of HBM bound':<34} {frac:>14}   >= 70%")
    if cuda and not peak:
        print(f"(no peak known for {name!r}: add it to PEAKS for MFU and the bandwidth fraction)")
    print(json.dumps(res))
    if not math.isfinite(tr["loss"]):
        sys.exit("training produced a non-finite loss")


if __name__ == "__main__":
    main()
