"""`tianying convert SRC DST`: rewrite a checkpoint in the Hugging Face or FlagAI v1 layout."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint between the Hugging Face and FlagAI layouts",
        description="Read a checkpoint in any supported layout (Hugging Face safetensors or .bin, sharded or "
                    "not; FlagAI v1 native pytorch_model.bin) and write it to DST in the chosen layout, "
                    "with its tokenizer files. DST is replaced atomically: an interrupted conversion leaves "
                    "no half-written checkpoint.",
        epilog="example: tianying convert ./AquilaChat-7B ./aquilachat-7b-hf --dtype bf16")
    p.add_argument("src", metavar="SRC", help="source checkpoint directory")
    p.add_argument("dst", metavar="DST", help="output directory (created; an existing checkpoint there is replaced)")
    p.add_argument("--to", choices=["hf", "flagai"], default="hf",
                   help="output layout: hf = safetensors + config.json that transformers loads (default); "
                        "flagai = FlagAI v1 native pytorch_model.bin")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast floating-point weights (default: keep the source dtype)")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="hf only: split safetensors into shards of at most SIZE, e.g. 500MB (default: 2GB)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tianying.checkpoint import convert, detect_format, parse_size

    parse_size(args.max_shard_size)  # fail on a bad size before reading anything
    src_format = detect_format(args.src)
    out = convert(args.src, args.dst, to=args.to, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"converted {args.src} ({src_format}) → {out} ({args.to}{', ' + args.dtype if args.dtype else ''})")
    return 0
