"""Serving throughput and latency: `tianying serve` under 1, 8 and 32 concurrent streaming clients.

Each client sends `--requests` streamed chat completions one after another (greedy, `--max-tokens` new tokens,
a different short question each time) and records the time to the first content token (TTFT). Per level:
requests/s, generated tokens/s (from the servers' `usage` counts), p50/p95 TTFT and the error count.

The peer, measured in the same run: the same server with `--max-concurrency 1`, i.e. a queue in front of a
single worker, which is what serving without continuous batching gives.

    .venv/bin/python benchmarks/serve.py models/demo            # a checkpoint
    .venv/bin/python benchmarks/serve.py                        # random `demo`-config weights in a temp dir
    .venv/bin/python benchmarks/serve.py --url http://127.0.0.1:8000 --api-key KEY   # a running server

Prints a table and, as its last line, one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

QUESTIONS = ["你好，请介绍一下北京。", "What is the capital of France?", "写一首关于春天的诗。",
             "Explain rotary position embeddings.", "天鹰模型是什么？", "List three prime numbers.",
             "如何学习编程？", "Why is the sky blue?"]


def random_demo_checkpoint(out: Path) -> Path:
    """A randomly initialised `demo`-config checkpoint with the demo tokenizer (until the trained one exists)."""
    from tianying.checkpoint import save_hf
    from tianying.config import Config
    from tianying.model import build_model

    tok_dir = Path(__file__).resolve().parents[1] / "tianying" / "assets" / "demo-tokenizer"
    cfg = Config.from_name("demo")
    save_hf(build_model(cfg, seed=0), cfg, out, tokenizer_dir=tok_dir)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tianying serve CKPT` in a subprocess, up until the context exits."""

    def __init__(self, ckpt: Path, max_concurrency: int, device: str, threads: int | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "tianying", "serve", str(ckpt), "--port", str(self.port),
                    "--max-concurrency", str(max_concurrency), "--device", device]
        if threads:
            self.cmd += ["--threads", str(threads)]

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, url: str, question: str, max_tokens: int) -> tuple[float, int]:
    """(time to first token, completion tokens) of one streamed chat completion."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def level(url: str, clients: int, requests: int, max_tokens: int, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    ttfts: list[float] = []
    tokens = errors = 0

    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=600) as client:
        async def worker(k: int) -> None:
            nonlocal tokens, errors
            for j in range(requests):
                try:
                    t, n = await one_request(client, url, QUESTIONS[(k + j) % len(QUESTIONS)], max_tokens)
                    ttfts.append(t)
                    tokens += n
                except Exception as e:  # counted, not fatal: the point is to see whether any happen
                    errors += 1
                    print(f"  error: {e}", file=sys.stderr)

        await one_request(client, url, QUESTIONS[0], 4)  # warm-up (first forward allocates the cache)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    return {"clients": clients, "requests": clients * requests, "errors": errors, "seconds": round(wall, 3),
            "req_per_s": round(len(ttfts) / wall, 3), "tok_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1), "ttft_p95_ms": round(q[18] * 1000, 1)}


def run_levels(url: str, args, label: str) -> list[dict]:
    rows = []
    for c in args.clients:
        row = {"server": label, **asyncio.run(level(url, c, args.requests, args.max_tokens, args.api_key))}
        print(f"{label:<22} {row['clients']:>7} {row['requests']:>8} {row['errors']:>6} {row['req_per_s']:>8.2f} "
              f"{row['tok_per_s']:>9.1f} {row['ttft_p50_ms']:>10.1f} {row['ttft_p95_ms']:>10.1f}", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="checkpoint to serve (default: random demo-config weights)")
    p.add_argument("--url", help="benchmark a server that is already running instead (no peer run)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                   help="concurrency levels, comma-separated (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--max-concurrency", type=int, default=32, help="server slots for the batched run (default 32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in the server (serve --threads)")
    p.add_argument("--no-peer", action="store_true", help="skip the --max-concurrency 1 peer run")
    args = p.parse_args()

    header = (f"{'server':<22} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>8} {'tok/s':>9} "
              f"{'TTFT p50 ms':>10} {'TTFT p95 ms':>10}")
    rows: list[dict] = []
    meta = {"max_tokens": args.max_tokens, "requests_per_client": args.requests, "device": args.device,
            "threads": args.threads, "cpus": os.cpu_count()}
    if args.url:
        print(header)
        rows += run_levels(args.url.rstrip("/"), args, "running server")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(args.checkpoint) if args.checkpoint else random_demo_checkpoint(Path(tmp) / "demo-random")
            meta["checkpoint"] = str(args.checkpoint or "random demo-config weights")
            print(f"checkpoint: {meta['checkpoint']}; {args.max_tokens} new tokens per request, "
                  f"{args.requests} requests per client, device {args.device}")
            print(header)
            with Server(ckpt, args.max_concurrency, args.device, args.threads) as s:
                rows += run_levels(s.url, args, f"batched (slots={args.max_concurrency})")
            if not args.no_peer:
                with Server(ckpt, 1, args.device, args.threads) as s:
                    rows += run_levels(s.url, args, "queue (slots=1)")
    print(json.dumps({"benchmark": "serve", **meta, "results": rows}))


if __name__ == "__main__":
    main()
