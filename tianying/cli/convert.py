"""`tianying convert SRC DST`: rewrite a checkpoint in the Hugging Face, FlagAI v1 or GGUF layout."""

from __future__ import annotations

import argparse
from pathlib import Path

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")  # tianying.gguf_io.GGUF_QUANTS (not imported: --help stays fast)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint between the Hugging Face, FlagAI and GGUF layouts",
        description="Read a checkpoint in any supported layout (Hugging Face safetensors or .bin, sharded or "
                    "not; FlagAI v1 native pytorch_model.bin; a llama-architecture .gguf file) and write it to "
                    "DST in the chosen layout, with its tokenizer files. DST is replaced atomically: an "
                    "interrupted conversion leaves no half-written checkpoint. A GGUF source becomes a Hugging "
                    "Face directory; its Q8_0/Q4_0 layers stay quantized (a GPTQ-format int8/int4 checkpoint) "
                    "unless --dtype asks for floating point.",
        epilog="examples: tianying convert ./AquilaChat-7B ./aquilachat-7b-hf --dtype bf16\n"
               "          tianying convert ./AquilaChat-7B aquilachat-7b-q8_0.gguf --to gguf --quant q8_0\n"
               "          tianying convert aquilachat-7b-q4_0.gguf ./aquilachat-7b-int4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source checkpoint directory or .gguf file")
    p.add_argument("dst", metavar="DST", help="output directory (created; an existing checkpoint there is replaced), "
                                              "or a .gguf file with --to gguf")
    p.add_argument("--to", choices=["hf", "flagai", "gguf"], default=None,
                   help="output layout: hf = safetensors + config.json that transformers loads (default); "
                        "flagai = FlagAI v1 native pytorch_model.bin; gguf = one file llama.cpp loads "
                        "(default when DST ends in .gguf)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="cast floating-point weights (default: keep the source dtype); with a GGUF source, "
                        "dequantize every layer into a float checkpoint of this dtype")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="gguf only: tensor type of the matrices (default f32; q8_0/q4_0 via gguf's quantizer, "
                        "1-D tensors stay f32)")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="hf only: split safetensors into shards of at most SIZE, e.g. 500MB (default: 2GB)")
    from tianying.cli._common import add_threads_arg

    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tianying.checkpoint import parse_size
    from tianying.errors import TianyingError

    src = Path(args.src)
    to = args.to or ("gguf" if args.dst.lower().endswith(".gguf") else "hf")
    if args.quant is not None and to != "gguf":
        raise TianyingError("--quant applies to GGUF output only (add --to gguf, or use --dtype)")
    if src.is_file():  # only a GGUF is a single file; gguf_io says so in one line when it is not one
        if to != "hf":
            raise TianyingError(f"a GGUF source converts to a Hugging Face directory (--to hf), not {to}")
        from tianying.gguf_io import convert_gguf

        out, what = convert_gguf(src, args.dst, dtype=args.dtype)
        print(f"converted {src} (gguf) → {out} (hf, {what})")
        return 0
    if to == "gguf":
        if args.dtype is not None:
            raise TianyingError("use --quant f32|f16|bf16|q8_0|q4_0 for GGUF output, not --dtype")
        from tianying.gguf_io import export_gguf

        out = export_gguf(src, args.dst, quant=args.quant or "f32")
        print(f"converted {src} → {out} (gguf, {args.quant or 'f32'})")
        return 0
    from tianying.checkpoint import convert, detect_format

    parse_size(args.max_shard_size)  # fail on a bad size before reading anything
    src_format = detect_format(args.src)
    out = convert(args.src, args.dst, to=to, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"converted {args.src} ({src_format}) → {out} ({to}{', ' + args.dtype if args.dtype else ''})")
    return 0
