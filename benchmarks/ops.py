"""Throughput of tianying.ops' products (`ops.linear`) against PyTorch's on the same weights, in one process.

For dense fp32 / bf16 weights and for QuantLinear's int8 / int4 weights, each shape and row count: GFLOP/s of
`ops.linear` and of PyTorch's product (`F.linear` in the weights' dtype; for quantized weights, F.linear with the
dequantized fp32 matrix: what the layers would do without the ops), best of alternating rounds. (`ops.linear` at
every row count: above 16 rows QuantLinear itself dequantizes row chunks for a GEMM instead.) With
`--against OTHER/cpu.cpp` the same calls run on a second build of the kernels (another commit's source, compiled
with this machine's flags) instead of PyTorch, alternating with this build in the same process: machine noise
(±20% between runs on shared VMs) then hits both sides alike.

    .venv/bin/python benchmarks/ops.py --rows 1,8,64,512 --threads 2
    .venv/bin/python benchmarks/ops.py --against /tmp/base/tianying/ops/cpu.cpp --rows 2,8,64
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tianying import ops  # noqa: E402
from tianying.quantize import QuantLinear, QuantSpec  # noqa: E402

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 11008)]  # (K, N): the 135M MLP, a 7B-class layer


def other_build(source: str, out: Path) -> ctypes.CDLL:
    subprocess.run([ops._compiler(), *ops._flags(), source, "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.ty_run.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.ty_run.restype = None
    return lib


def best_of(fns: dict, rounds: int, reps: int) -> dict:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t = time.perf_counter()
            for _ in range(reps):
                f()
            best[k] = min(best[k], (time.perf_counter() - t) / reps)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,64,512", help="comma-separated activation row counts")
    p.add_argument("--weights", default="fp32,bf16,int8,int4", help="comma-separated: fp32, bf16, int8, int4")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds (best kept)")
    p.add_argument("--against", metavar="CPU_CPP", help="compare with another build of tianying/ops/cpu.cpp")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if not ops.enabled():
        sys.exit("the native ops are not available here (no C++ compiler?)")
    mine = ops._load()
    theirs = other_build(a.against, Path(tempfile.mkdtemp()) / "other.so") if a.against else None
    peer = "other build" if theirs else "PyTorch"
    rows, results = [int(r) for r in a.rows.split(",")], []
    g = torch.Generator().manual_seed(0)
    print(f"| weights | K | N | rows | tianying GFLOP/s | {peer} GFLOP/s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in a.weights.split(","):
        for K, N in SHAPES:
            w = torch.randn(N, K, generator=g) * 0.05
            if kind in ("int8", "int4"):
                spec = QuantSpec(int(kind[3]), -1 if kind == "int8" else 64, True)
                q = QuantLinear.from_linear(torch.nn.Linear(K, N, bias=False), spec)
                op, ref_w = q.native_weight(), q.dequantize()
            else:
                ref_w = w.to(torch.bfloat16 if kind == "bf16" else torch.float32)
                op = ops.dense_weight(ref_w)
            if op is None:
                continue
            for M in rows:
                x = torch.randn(M, K, generator=g)
                xt = x.to(ref_w.dtype)

                def ours(lib=mine, x=x, op=op) -> None:  # noqa: ANN001
                    ops._LIB = lib
                    ops.linear(x, op)

                def pytorch(xt=xt, w=ref_w) -> None:  # noqa: ANN001
                    F.linear(xt, w)

                fns = {"ours": ours, "peer": (lambda: ours(theirs)) if theirs else pytorch}
                reps = max(2, int(3e8 / (2 * M * N * K)))
                t = best_of(fns, a.rounds, reps)
                ops._LIB = mine
                gf = {k: 2 * M * N * K / v / 1e9 for k, v in t.items()}
                results.append({"weights": kind, "K": K, "N": N, "rows": M, "tianying_gflops": gf["ours"],
                                "peer_gflops": gf["peer"]})
                print(f"| {kind} | {K} | {N} | {M} | {gf['ours']:.1f} | {gf['peer']:.1f} | "
                      f"{gf['ours'] / gf['peer']:.2f}× |", flush=True)
    print(json.dumps({"bench": "ops", "peer": peer, "threads": a.threads,
                      "capability": torch.backends.cpu.get_cpu_capability(), "results": results}))


if __name__ == "__main__":
    main()
