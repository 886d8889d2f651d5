"""`tianying quantize CKPT OUT`: write a GPTQ-format int8/int4 checkpoint (round-to-nearest or GPTQ)."""

from __future__ import annotations

import argparse

from tianying.cli._common import add_progress_arg, add_threads_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a checkpoint to int8/int4 (GPTQ format), by rounding or by GPTQ",
        description="Quantize every linear layer of the transformer blocks (the LM head and embeddings stay in "
                    "floating point) and write a GPTQ-format checkpoint (qweight/qzeros/scales/g_idx + "
                    "quantization_config) that tianying, transformers and AutoGPTQ/GPTQModel load. rtn rounds "
                    "each weight to the nearest level; gptq uses calibration text to compensate rounding errors "
                    "column by column (better quality, needs --calibration).",
        epilog="example: tianying quantize ./aquilachat2-7b ./aquilachat2-7b-int4 --bits 4 --method gptq "
               "--calibration data.jsonl --samples 128")
    p.add_argument("checkpoint", metavar="CKPT", help="source checkpoint directory")
    p.add_argument("out", metavar="OUT", help="output directory (replaced atomically)")
    p.add_argument("--bits", type=int, default=4, help="8 or 4 (default: 4)")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="input columns sharing one scale: 32, 64, 128 or -1 for per channel (default: -1 for 8 "
                        "bits; 128 for 4 bits, or with a warning the largest power of two below it dividing every "
                        "layer's width, e.g. 16 for the demo model's FFN width 688)")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point per group) instead of symmetric")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the LM head too, by rounding (off by default as in AutoGPTQ: it costs quality, "
                        "but on a 100k vocabulary it is the largest matrix and dominates decode speed)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="rtn (default) or gptq")
    p.add_argument("--calibration", metavar="FILE",
                   help="gptq: calibration text (.txt, or .jsonl[.gz] with a 'text' field per line)")
    p.add_argument("--samples", type=int, default=128, metavar="N", help="gptq: calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, metavar="T", help="gptq: tokens per window (default 512)")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation "
                                                            "(desc_act; usually better at 4 bits)")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: damping as a fraction of mean diag(H)")
    p.add_argument("--seed", type=int, default=0, help="gptq: seed for choosing calibration windows")
    add_progress_arg(p)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tianying.checkpoint import load_model
    from tianying.quantize import QuantizeError, QuantSpec, quantized_layers
    from tianying.quantize.format import save_quantized
    from tianying.quantize.linear import quantize_model

    QuantSpec(args.bits, -1 if args.group_size is None else args.group_size, not args.asym)  # early checks
    if args.method == "gptq" and not args.calibration:
        raise QuantizeError("--method gptq needs --calibration FILE")
    if args.method == "rtn" and (args.calibration or args.act_order):
        raise QuantizeError("--calibration/--act-order only apply to --method gptq")
    model, cfg = load_model(args.checkpoint, device="cpu", dtype=torch.float32)
    if args.method == "rtn":
        quantize_model(model, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                       lm_head=args.quantize_lm_head)
    else:
        from tianying.quantize.gptq import gptq_quantize
        from tianying.tokenizer import Tokenizer

        samples = calibration_samples(args.calibration, Tokenizer.from_dir(args.checkpoint), args.samples,
                                      args.seq_len, args.seed)
        gptq_quantize(model, samples, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                      act_order=args.act_order, damp=args.damp, lm_head=args.quantize_lm_head,
                      progress=not args.no_progress)
    spec = next(iter(quantized_layers(model).values())).spec  # after any group-size fallback
    model.to(torch.float16)  # what GPTQ checkpoints store for the unquantized tensors
    out = save_quantized(model, cfg, args.out, tokenizer_dir=args.checkpoint, method=args.method,
                         damp_percent=args.damp)
    print(f"quantized {args.checkpoint} → {out} ({args.method}, {spec.bits} bits, group {spec.group_size}, "
          f"{'sym' if spec.sym else 'asym'}{', LM head too' if args.quantize_lm_head else ''})")
    return 0


def calibration_samples(path: str, tokenizer, n: int, seq_len: int, seed: int = 0) -> list:  # noqa: ANN001
    """n windows of seq_len tokens, drawn at random from the concatenated documents (eos between them)."""
    import gzip
    import json
    import random
    from pathlib import Path

    import torch

    from tianying.quantize import QuantizeError

    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        if ".jsonl" in p.suffixes:
            texts = []
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    texts.append(obj if isinstance(obj, str) else obj.get("text", ""))
        else:
            texts = [t for t in f.read().split("\n\n") if t.strip()]
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t)
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        if len(ids) >= n * seq_len * 4:
            break
    if not ids:
        raise QuantizeError(f"{path}: no calibration text")
    if len(ids) <= seq_len:
        return [torch.tensor(ids)]
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(n)]
    return [torch.tensor(ids[s:s + seq_len]) for s in starts]
