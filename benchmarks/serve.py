"""Serving throughput and latency: `tianying serve` against llama.cpp's `llama-server` on the same weights.

Per weights variant (fp32 vs llama.cpp f32; int8 with the LM head quantized vs q8_0) and per level of 1, 8 and
32 concurrent streaming clients, each client sends `--requests` streamed completions one after another (greedy,
`--max-tokens` new tokens, a different short prompt each time) and records the time to the first token (TTFT).
Reported: generated tokens/s over the level's wall time, p50/p95 TTFT, errors. Both servers get the same CPU
threads and as many parallel sequences as the largest level (`--max-concurrency` / `-np`).

Also, at 1 client: `LLM.generate` in-process on the same weights (the engine without HTTP), and the TTFT of the
5th turn of a conversation (each turn resends the whole history) with and without prefix caching.

    python benchmarks/serve.py --shape 135m --threads 2 --llama-cpp /path/to/llama.cpp
    python benchmarks/serve.py models/demo --variants fp32 --clients 1,8 --peer none

The GGUF files come from tianying's own exporter (`tianying convert CKPT out.gguf --to gguf`); llama-server is
built as benchmarks/llama_cpp.py documents (add `-DLLAMA_BUILD_SERVER=ON` and the `llama-server` target).
Prints a table and, as its last line, one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["北京是中国的首都，", "The capital of France is", "春天来了，", "Rotary position embeddings are",
           "天鹰模型是", "Three prime numbers are", "学习编程的方法是", "The sky is blue because"]
SHAPES = {  # random weights of a named shape (the issues' measurements used a real 135M model of this shape)
    "135m": dict(vocab_size=49152, hidden_size=576, n_layer=30, n_head=9, n_kv_head=3, intermediate_size=1536,
                 max_position_embeddings=2048),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tianying(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tianying", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def random_checkpoint(shape: str, out: Path) -> Path:
    import torch

    from tianying.checkpoint import save_hf
    from tianying.config import Config
    from tianying.model import build_model

    cfg = Config.from_name("demo").replace(name=f"random-{shape}", **SHAPES[shape]) if shape in SHAPES else \
        Config.from_name(shape)
    save_hf(build_model(cfg, seed=0), cfg, out, tokenizer_dir=ROOT / "tianying" / "assets" / "demo-tokenizer",
            dtype=torch.float32)
    return out


class Server:
    """A server process (tianying serve or llama-server), up until the context exits."""

    def __init__(self, cmd: list[str], port: int, label: str) -> None:
        self.cmd, self.url, self.label = [str(c) for c in cmd], f"http://127.0.0.1:{port}", label

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{self.label} did not start")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tianying_server(ckpt: Path, args, prefix_cache: int = 256) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "tianying", "serve", ckpt, "--port", port, "--max-concurrency", max(args.clients),
           "--prefix-cache", prefix_cache]
    if args.threads:
        cmd += ["--threads", args.threads]
    return Server(cmd, port, "tianying serve")


def llama_server(binary: Path, gguf: Path, args, ctx: int) -> Server:
    port = free_port()
    n = max(args.clients)
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", port, "-np", n, "-c", n * ctx, "--no-webui"]
    if args.threads:
        cmd += ["-t", args.threads, "-tb", args.threads]
    return Server(cmd, port, "llama-server")


# ---------------------------------------------------------------------------------------------- clients
async def one_request(client: httpx.AsyncClient, url: str, body: dict, route: str) -> tuple[float, int, str]:
    """(time to first token, completion tokens, text) of one streamed request."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, chunks, text = None, None, 0, []
    async with client.stream("POST", url + route, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for c in chunk.get("choices") or ():
                piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if piece:
                    chunks += 1
                    text.append(piece)
                    if ttft is None:
                        ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or {}
            if usage.get("completion_tokens"):
                tokens = usage["completion_tokens"]
            elif (chunk.get("timings") or {}).get("predicted_n"):
                tokens = chunk["timings"]["predicted_n"]
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens or chunks, "".join(text)


async def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    ttfts: list[float] = []
    tokens = errors = 0

    def body(k: int) -> dict:  # ignore_eos: llama-server stops at EOS otherwise (tianying warns and ignores it)
        return {"prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    async with httpx.AsyncClient(limits=limits, timeout=900) as client:
        async def worker(k: int) -> None:
            nonlocal tokens, errors
            for j in range(requests):
                try:
                    t, n, _ = await one_request(client, url, body(k + j), "/v1/completions")
                    ttfts.append(t)
                    tokens += n
                except Exception as e:  # counted, not fatal: the point is to see whether any happen
                    errors += 1
                    print(f"  error: {e}", file=sys.stderr)

        await one_request(client, url, {**body(0), "max_tokens": 4}, "/v1/completions")  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    return {"clients": clients, "requests": clients * requests, "errors": errors, "seconds": round(wall, 3),
            "tok_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p95_ms": round(q[18] * 1000, 1)}


async def conversation_ttft(url: str, turns: int, conversations: int, max_tokens: int) -> float:
    """Median TTFT (ms) of turn `turns` of a chat whose every turn resends the whole history."""
    system = ("你是天鹰，一个乐于助人的双语助手。Answer in the language of the question, briefly and exactly. " * 3)
    out = []
    async with httpx.AsyncClient(timeout=900) as client:
        for c in range(conversations):
            msgs = [{"role": "system", "content": system}]
            for t in range(turns):
                msgs.append({"role": "user", "content": f"第{c}段对话，第{t}个问题：{PROMPTS[(c + t) % len(PROMPTS)]}"
                                                        + " 请详细说明。" * 4})
                ttft, _, reply = await one_request(client, url, {"messages": msgs, "max_tokens": max_tokens,
                                                                 "temperature": 0}, "/v1/chat/completions")
                msgs.append({"role": "assistant", "content": reply})
            out.append(ttft)
    return round(statistics.median(out) * 1000, 1)


def in_process_rate(ckpt: Path, args) -> float:
    """LLM.generate tokens/s at batch 1 (the same engine without HTTP), median of the prompts."""
    import torch

    from tianying.api import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM.load(ckpt)
    llm.generate(PROMPTS[0], max_new_tokens=4)
    rates = []
    for p in PROMPTS[:4]:
        ids = llm.encode_prompt(p)
        params = llm.sampling_params(max_new_tokens=args.max_tokens, stop_token_ids=())
        t = time.perf_counter()
        n = len(llm.generate_ids([ids], params)[0])
        rates.append(n / (time.perf_counter() - t))
    return round(statistics.median(rates), 1)


# ---------------------------------------------------------------------------------------------- main
def find_llama_server(src: str | None) -> Path | None:
    for d in ([Path(src) / "build" / "bin", Path(src)] if src else []):
        if (d / "llama-server").is_file():
            return d / "llama-server"
    hit = shutil.which("llama-server")
    return Path(hit) if hit else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", help="checkpoint to serve (default: random weights of --shape)")
    p.add_argument("--shape", default="135m", help="random weights: a SHAPES key or a tianying config name")
    p.add_argument("--variants", default="fp32,int8", help="fp32 and/or int8 (default: both)")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32],
                   help="concurrency levels, comma-separated (default: 1,8,32)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default: 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of both servers (default: 2)")
    p.add_argument("--peer", choices=["llama-server", "none"], default="llama-server")
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"), metavar="DIR",
                   help="llama.cpp checkout with build/bin/llama-server (default: $LLAMA_CPP_DIR, else PATH)")
    p.add_argument("--turns", type=int, default=5, help="conversation turn whose TTFT is measured (default: 5)")
    args = p.parse_args()

    binary = find_llama_server(args.llama_cpp) if args.peer == "llama-server" else None
    if args.peer == "llama-server" and binary is None:
        sys.exit("llama-server not found: pass --llama-cpp DIR (see benchmarks/llama_cpp.py), or --peer none")
    rows, extra = [], {}
    print(f"{'variant':<7} {'server':<15} {'clients':>7} {'tok/s':>8} {'TTFT p50 ms':>11} {'TTFT p95 ms':>11} "
          f"{'errors':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = Path(args.checkpoint) if args.checkpoint else random_checkpoint(args.shape, tmp / "fp32")
        for variant in args.variants.split(","):
            ckpt, quant = base, "f32"
            if variant == "int8":
                ckpt, quant = tmp / "int8", "q8_0"
                tianying("quantize", base, ckpt, "--bits", "8", "--quantize-lm-head")
            elif variant != "fp32":
                sys.exit(f"unknown variant {variant!r}: fp32 or int8")
            servers = [("tianying", lambda ckpt=ckpt: tianying_server(ckpt, args))]
            if binary is not None:
                gguf = tmp / f"model-{quant}.gguf"
                tianying("convert", base, gguf, "--to", "gguf", "--quant", quant)
                servers.append(("llama-server", lambda gguf=gguf: llama_server(binary, gguf, args, 256)))
            for name, make in servers:
                with make() as s:
                    for c in args.clients:
                        r = {"variant": variant, "server": name, **asyncio.run(level(s.url, c, args.requests,
                                                                                     args.max_tokens))}
                        rows.append(r)
                        print(f"{variant:<7} {name:<15} {c:>7} {r['tok_per_s']:>8.1f} {r['ttft_p50_ms']:>11.1f} "
                              f"{r['ttft_p95_ms']:>11.1f} {r['errors']:>6}", flush=True)
            extra[f"llm_generate_{variant}_tok_s"] = in_process_rate(ckpt, args)
            print(f"{variant:<7} {'LLM.generate':<15} {1:>7} {extra[f'llm_generate_{variant}_tok_s']:>8.1f}",
                  flush=True)
        # the 5th turn of a conversation: prefix caching on (default) and off
        for cache in (256, 0):
            with tianying_server(base, args, prefix_cache=cache) as s:
                extra[f"turn{args.turns}_ttft_ms_prefix_cache_{'on' if cache else 'off'}"] = asyncio.run(
                    conversation_ttft(s.url, args.turns, 3, 24))
        on, off = (extra[f"turn{args.turns}_ttft_ms_prefix_cache_{k}"] for k in ("on", "off"))
        print(f"turn {args.turns} TTFT (fp32, 1 client): prefix cache on {on:.1f} ms, off {off:.1f} ms "
              f"({on / off:.2f}x)")
    ratios = {}
    for r in rows:
        if r["server"] == "tianying":
            peer = next((x for x in rows if x["server"] == "llama-server" and x["variant"] == r["variant"]
                         and x["clients"] == r["clients"]), None)
            if peer:
                ratios[f"{r['variant']}_c{r['clients']}"] = round(r["tok_per_s"] / peer["tok_per_s"], 2)
    if ratios:
        print("tok/s ratio tianying / llama-server: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    meta = {"max_tokens": args.max_tokens, "requests_per_client": args.requests, "threads": args.threads,
            "cpus": os.cpu_count(), "checkpoint": args.checkpoint or f"random {args.shape}"}
    print(json.dumps({"benchmark": "serve", **meta, "results": rows, **extra, "ratios": ratios}))


if __name__ == "__main__":
    main()
