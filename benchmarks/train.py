"""Training throughput and peak memory: tianying's training step vs transformers' LlamaForCausalLM.

Same config (weights copied), same batch, same sequence length, same optimizer (AdamW, fused where torch has
it), same gradient clipping, in one process. The two steps run in alternating rounds and each reports its
best round, so a busy machine slows both alike instead of whichever happened to run second. Peak memory is
measured in a fresh subprocess per (model, precision): peak RSS growth over the process's RSS before the
model was built (CPU) or `max_memory_allocated` (GPU).

tianying's step is `tianying.train.loop.train`'s inner step, with the loop's own objective (`TokenLoss`):
the model's final hidden states go into `tianying.train.loss.linear_cross_entropy`, which applies the LM
head and the cross-entropy in chunks of rows against pre-shifted labels (no [B, T, V] logits, their
log-softmax or their gradient in memory), loss summed and divided by the token count, fused AdamW, fp32
master weights with autocast for bf16. transformers' step is `model(input_ids, labels=...).loss`.
`--compile` adds a `torch.compile`d tianying row (the loop's `compile: true`).

    python benchmarks/train.py                       # demo config, batch 4 × 256, fp32 and bf16
    python benchmarks/train.py --size small --dtypes fp32 --compile

The last line is one JSON document with every number.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(impl: str, size: str, seed: int = 0, device: str = "cpu"):
    from tianying.config import Config
    from tianying.model import build_model

    cfg = Config.from_name(size)
    ty = build_model(cfg, device=device, seed=seed)
    if impl.startswith("tianying"):
        return ty, cfg
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig(**hf_cfg))
    hf.load_state_dict(ty.state_dict(), strict=False)  # identical weights, so identical work
    del ty
    return hf, cfg


def make_step(impl: str, model, ids: torch.Tensor, precision: str, device: str):
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    fused = device == "cpu" or device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    model.train()

    def ctx():
        return torch.autocast(device.split(":")[0], dtype=amp) if amp else torch.autocast("cpu", enabled=False)

    if impl.startswith("tianying"):
        from tianying.train.loop import TokenLoss

        fwd = torch.compile(model) if impl == "tianying+compile" else model
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        objective = TokenLoss()

        def step():
            loss = objective(fwd, (x, y), ctx)[0] / y.numel()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
    else:
        x = ids[:, :-1].contiguous()

        def step():
            with ctx():
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB; ru_maxrss where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> None:
    """Forget the peak left by importing torch, so the peak we read is the training's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_worker(args) -> None:
    """Child process: peak memory of a few training steps of one model at one precision."""
    device = args.device
    rss0 = _rss_kib("VmRSS")
    _reset_peak_rss()
    model, cfg = build(args.impl, args.size, device=device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    step = make_step(args.impl, model, ids, args.precision, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (_rss_kib("VmHWM") - rss0) / 1024
    print(json.dumps({"peak_mib": round(peak, 1)}))


def peak_memory(args, impl: str, precision: str) -> float | None:
    cmd = [sys.executable, __file__, "--memory-worker", "--impl", impl, "--size", args.size, "--batch",
           str(args.batch), "--seq", str(args.seq), "--precision", precision, "--device", args.device]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["peak_mib"]
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="demo", help="named config (demo, tiny, small, ...)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    p.add_argument("--steps", type=int, default=3, help="steps per round (fp32; bf16 uses --bf16-steps)")
    p.add_argument("--bf16-steps", type=int, default=1, help="bf16 is emulated (slow) on CPUs without AVX512-BF16")
    p.add_argument("--compile", action="store_true", help="add a torch.compile'd tianying row")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="tianying", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args)

    from tianying.train.loop import flops_per_token, peak_flops

    impls = ["tianying", "transformers"] + (["tianying+compile"] if args.compile else [])
    results = []
    tokens = args.batch * args.seq
    for precision in args.dtypes.split(","):
        steps = args.bf16_steps if precision != "fp32" else args.steps
        runs = {}
        for impl in impls:
            model, cfg = build(impl, args.size, device=args.device)
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=args.device,
                                generator=torch.Generator(args.device).manual_seed(0))
            runs[impl] = make_step(impl, model, ids, precision, args.device)
            t0 = time.perf_counter()
            runs[impl]()  # warm-up (and compilation)
            sync(args.device)
            print(f"[{precision}] {impl}: warm-up step {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        best = {impl: 0.0 for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                sync(args.device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    runs[impl]()
                sync(args.device)
                best[impl] = max(best[impl], tokens * steps / (time.perf_counter() - t0))
        del runs
        amp = {"bf16": torch.bfloat16}.get(precision, torch.float32)
        peak = peak_flops(torch.device(args.device), amp) if args.device != "cpu" else None  # None: not known
        n_no_embed = cfg.n_params - cfg.vocab_size * cfg.hidden_size
        fpt = flops_per_token(n_no_embed, cfg.n_layer, cfg.hidden_size, args.seq)
        for impl in impls:
            mem = None if args.no_memory or impl == "tianying+compile" else peak_memory(args, impl, precision)
            results.append({"impl": impl, "precision": precision, "tokens_per_sec": round(best[impl], 1),
                            "speedup_vs_transformers": round(best[impl] / best["transformers"], 3),
                            # a CPU has no trustworthy peak (bf16 is emulated on many): MFU on GPUs only
                            "mfu": round(best[impl] * fpt / peak, 4) if peak else None,
                            "peak_mib": mem})
    hdr = f"{'impl':<18} {'precision':<9} {'tokens/s':>10} {'vs HF':>7} {'MFU':>7} {'peak MiB':>9}"
    print(f"\nmodel {args.size} ({cfg.n_params / 1e6:.1f}M params), batch {args.batch} × seq {args.seq}, "
          f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        mfu = f"{r['mfu']:.2%}" if r["mfu"] is not None else "-"
        print(f"{r['impl']:<18} {r['precision']:<9} {r['tokens_per_sec']:>10.1f} {r['speedup_vs_transformers']:>6.2f}x "
              f"{mfu:>7} {mem:>9}")
    import transformers

    print(json.dumps({"benchmark": "train", "model": args.size, "params": cfg.n_params, "batch": args.batch,
                      "seq": args.seq, "device": args.device, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "transformers": transformers.__version__, "results": results}))


if __name__ == "__main__":
    main()
