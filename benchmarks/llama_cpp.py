"""llama.cpp peer benchmark: batch-1 decode tok/s of llama.cpp on the same weights as a tianying checkpoint.

The checkpoint (or random weights for a named config, seed 0) is exported to a GGUF f32 file by tianying's own
exporter (`tianying convert CKPT model.gguf`, tianying/gguf_io.py: architecture "llama", q/k rows in GGML's
order, the tokenizer and chat template). llama-quantize then makes the q8_0 and q4_0 files, and llama-bench runs its
batch-1 decode test (`tg`: -p 0 -n N) on each file. The script prints a table, then one JSON line. q4_0 is
llama-quantize's default mix, which keeps output.weight (the LM head) at q6_K. Append `-pure` to a variant
(`q4_0-pure`) for `llama-quantize --pure`: every matrix in that type, LM head and embeddings included. The
"types" column reads the tensor types back from each file. For the same-machine comparison, run
benchmarks/quantize.py (tianying int8/int4, `-head` variants quantize the LM head too) with the same --threads:

    python benchmarks/llama_cpp.py --config small --threads 2 --llama-cpp /path/to/llama.cpp
    python benchmarks/llama_cpp.py --checkpoint ./demo-model --variants f32,q8_0,q4_0,q4_0-pure --keep ./gguf

Only llama-bench and llama-quantize are needed. They were built from the llama.cpp sources vendored in the
llama-cpp-python 0.3.36 sdist (any recent llama.cpp checkout builds the same way):

    pip download llama-cpp-python==0.3.36 --no-deps          # llama_cpp_python-0.3.36.tar.gz (an sdist)
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build -j2 --target llama-bench llama-quantize

(The shared build in /work/llama.cpp also has llama-simple, llama-completion, llama-cli and llama-server:
-DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON.) Pass that directory as --llama-cpp (or set LLAMA_CPP_DIR).
The binaries are looked up in DIR/build/bin.

The export writes the tokenizer too: byte-level BPE (tokenizer model "gpt2", pre-tokenizer "gpt-2", which is
Aquila's GPT-2 regex), with the special tokens as CONTROL. A vocabulary smaller than the model's (the 16,000-token
demo tokenizer with the 100,008-row `tiny`/`small` configs) is padded with "[PADi]" tokens of type UNUSED, as
convert_hf_to_gguf.py does. BOS/EOS are the tokenizer's own ids.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tianying.errors import TianyingError  # noqa: E402 - after the sys.path insert

DEMO_TOKENIZER = ROOT / "tianying" / "assets" / "demo-tokenizer"
BUILD_HINT = ("build it (cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && "
              "cmake --build build --target llama-bench llama-quantize, in a llama.cpp checkout; see this "
              "script's docstring) and pass --llama-cpp DIR or set LLAMA_CPP_DIR")


class BenchError(Exception):
    """A failure reported as one line, without a traceback."""


# ---------------------------------------------------------------------- llama.cpp
def find_binaries(src: str | None) -> dict[str, Path]:
    """llama-bench and llama-quantize from DIR/build/bin (DIR itself if it holds them), else from $PATH."""
    dirs = [Path(src) / "build" / "bin", Path(src)] if src else []
    found = {}
    for name in ("llama-bench", "llama-quantize"):
        cands = [d / name for d in dirs] + ([] if src else [Path(p) for p in [shutil.which(name)] if p])
        hit = next((c for c in cands if c.is_file() and os.access(c, os.X_OK)), None)
        if hit is None:
            where = f"in {dirs[0]}" if src else "(no --llama-cpp DIR or LLAMA_CPP_DIR given, and not on PATH)"
            raise BenchError(f"{name} not found {where}; {BUILD_HINT}")
        found[name] = hit
    return found


# ---------------------------------------------------------------------- export
def export_gguf(ckpt: Path, out: Path) -> dict:
    """Write `ckpt` as a GGUF f32 file with tianying's exporter (tianying.gguf_io); return a few facts."""
    from tianying.checkpoint import load_config
    from tianying.gguf_io import export_gguf as write

    if not ((ckpt / "tokenizer.json").is_file() or (ckpt / "vocab.json").is_file()):
        raise BenchError(f"{ckpt} has no tokenizer files (the GGUF needs its vocabulary)")
    cfg = load_config(ckpt)
    write(ckpt, out, quant="f32")
    return {"name": cfg.name, "n_params": cfg.n_params, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "n_layer": cfg.n_layer}


def random_checkpoint(name: str, out: Path) -> Path:
    import torch

    from tianying.checkpoint import save_hf
    from tianying.config import Config
    from tianying.model import Transformer

    cfg = Config.from_name(name)
    m = Transformer(cfg)
    torch.manual_seed(0)
    m.init_weights()
    save_hf(m, cfg, out, tokenizer_dir=DEMO_TOKENIZER, dtype=torch.float32)
    del m
    gc.collect()
    return out


# ---------------------------------------------------------------------- quantize and bench
def _run(cmd: list, what: str) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace")
    if p.returncode != 0:
        tail = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise BenchError(f"{what} failed (exit {p.returncode}): {tail[0].strip()}")
    return p


def quantize(bins: dict[str, Path], f32: Path, variant: str, out_dir: Path, threads: int) -> Path:
    qtype, _, flag = variant.partition("-")
    out = out_dir / f"model-{variant}.gguf"
    cmd = [bins["llama-quantize"], *(["--pure"] if flag == "pure" else []), f32, out, qtype.upper(), threads]
    _run(cmd, f"llama-quantize {variant}")
    return out


def tensor_types(path: Path) -> str:
    """'blocks / output / token_embd' matrix types, e.g. 'q4_0 / q6_K / q4_0'."""
    from tianying.gguf_io import iter_types

    kinds = dict(iter_types(path))
    blk = sorted({v for k, v in kinds.items() if k.startswith("blk.") and not k.endswith("norm.weight")})
    return f"{'+'.join(blk)} / {kinds.get('output.weight', '-')} / {kinds.get('token_embd.weight', '-')}"


def bench(bins: dict[str, Path], path: Path, args: argparse.Namespace) -> dict:
    cmd = [bins["llama-bench"], "-m", path, "-p", 0, "-n", args.tokens, "-t", args.threads, "-r", args.repeats,
           "-o", "json"]
    p = _run(cmd, f"llama-bench {path.name}")
    try:
        rows = json.loads(p.stdout)
        row = next(r for r in rows if r.get("n_gen") == args.tokens and r.get("n_prompt") == 0)
    except (json.JSONDecodeError, StopIteration):
        raise BenchError(f"llama-bench {path.name}: no tg{args.tokens} result in its JSON output") from None
    samples = [float(s) for s in row.get("samples_ts") or [row["avg_ts"]]]
    return {"tok_s": float(row["avg_ts"]), "tok_s_std": float(row.get("stddev_ts", 0.0)),
            "samples": samples, "model_size": row.get("model_size"),
            "build": f"b{row.get('build_number')} ({row.get('build_commit')})", "cpu": row.get("cpu_info"),
            "flash_attn": row.get("flash_attn"), "type_k": row.get("type_k")}


def _fmt_rate(mean: float, std: float) -> str:
    digits = 1 if mean >= 10 else 2
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def print_table(results: list[dict]) -> None:
    """The markdown table; the median is there because one preempted repetition can halve the mean."""
    print("| variant | types (blocks / output / token_embd) | file MiB | decode tok/s b1 (mean ± sd) | median |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        rate = _fmt_rate(r["tok_s"], r["tok_s_std"])
        med = _fmt_rate(r["tok_s_median"], 0).split(" ±")[0]
        print(f"| {r['variant']} | {r['types']} | {r['file_mib']:,.1f} | {rate} | {med} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=Path, help="tianying / Hugging Face checkpoint directory")
    src.add_argument("--config", help="named config with random weights (seed 0), e.g. small (default)")
    ap.add_argument("--variants", default="f32,q8_0,q4_0",
                    help="comma-separated: f32 and llama-quantize types (q8_0, q4_0, q4_k_m...); "
                         "a -pure suffix adds --pure (default f32,q8_0,q4_0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per llama-bench repetition")
    ap.add_argument("--repeats", type=int, default=3, help="llama-bench repetitions (mean ± stdev over them)")
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                    help="llama.cpp source dir; binaries in DIR/build/bin (default $LLAMA_CPP_DIR)")
    ap.add_argument("--keep", type=Path, help="write the GGUF files here and keep them (default: a temp dir)")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants:
        ap.error("--variants is empty")
    if args.checkpoint is None and args.config is None:
        args.config = "small"

    bins = find_binaries(args.llama_cpp)
    with tempfile.TemporaryDirectory(prefix="tianying-llama-cpp-") as tmp:
        out_dir = args.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.checkpoint is not None:
            if not (args.checkpoint / "config.json").is_file():
                raise BenchError(f"{args.checkpoint}: no config.json (not a checkpoint directory)")
            ckpt = args.checkpoint
        else:
            print(f"writing random-weight '{args.config}' checkpoint (seed 0)...", file=sys.stderr)
            ckpt = random_checkpoint(args.config, Path(tmp) / "checkpoint")
        f32 = out_dir / "model-f32.gguf"
        print(f"exporting {ckpt} -> {f32}...", file=sys.stderr)
        info = export_gguf(ckpt, f32)
        if args.checkpoint is None:
            shutil.rmtree(ckpt)  # only the GGUF files are needed from here on

        results = []
        for v in variants:
            path = f32 if v == "f32" else quantize(bins, f32, v, out_dir, args.threads)
            print(f"llama-bench {v} (tg{args.tokens}, {args.threads} threads, {args.repeats} reps)...",
                  file=sys.stderr)
            r = bench(bins, path, args)
            results.append({"variant": v, "types": tensor_types(path),
                            "file_mib": round(path.stat().st_size / 2**20, 1), **r})

    model = str(args.checkpoint) if args.checkpoint is not None else f"{args.config} (random, seed 0)"
    head = results[0]
    fa = {-1: "auto", 0: "off", 1: "on"}.get(head["flash_attn"], head["flash_attn"])
    load = os.getloadavg()[0]  # other jobs on the cores cost llama.cpp's spinning thread pool a lot
    print(f"\nllama.cpp {head['build']} on {head['cpu']}: {model}, {info['n_params'] / 1e6:.0f}M params, "
          f"batch-1 decode tg{args.tokens}, {args.threads} threads, {args.repeats} reps, flash-attn {fa}, "
          f"KV {head['type_k']}, load average {load:.2f} on {os.cpu_count()} CPUs\n")
    for r in results:
        r["tok_s_median"] = statistics.median(r["samples"])
    print_table(results)
    doc = {"benchmark": "llama_cpp", "model": model, **{k: info[k] for k in ("n_params", "vocab_size",
           "hidden_size", "n_layer")}, "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
           "llama_cpp": head["build"], "cpu": head["cpu"], "load_avg": round(load, 2),
           "results": [{k: r[k] for k in ("variant", "types", "file_mib", "tok_s", "tok_s_std", "samples",
                                          "tok_s_median")} for r in results]}
    print(json.dumps(doc))


if __name__ == "__main__":
    try:
        main()
    except (BenchError, TianyingError) as e:
        sys.exit(f"llama_cpp.py: {e}")
