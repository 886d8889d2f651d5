"""`tianying merge-lora CKPT ADAPTER OUT`: fold a LoRA adapter into its base, writing a full checkpoint."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("merge-lora", help="merge a PEFT LoRA adapter into its base checkpoint",
                       description="Write OUT, a Hugging Face checkpoint whose weights are W + (alpha/r)·B·A. "
                                   "For a Q-LoRA adapter the base is first quantized to NF4 and dequantized, as "
                                   "it was seen in training (--base float merges into the original weights).")
    p.add_argument("checkpoint", metavar="CKPT", help="base model directory")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (adapter_config.json + weights)")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory")
    p.add_argument("--base", choices=["auto", "float", "nf4"], default="auto",
                   help="how to hold the base before merging (auto: NF4 for a Q-LoRA adapter, else float)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the written weights (default: the base checkpoint's)")
    from tianying.cli._common import add_threads_arg

    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from tianying.lora import merge_checkpoint

    out = merge_checkpoint(args.checkpoint, args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"merged checkpoint: {out}")
    return 0
