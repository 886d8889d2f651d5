"""`tianying finetune --method full|lora|qlora --data FILE --checkpoint CKPT [--config FILE] [key=value ...]`."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("finetune", help="supervised finetuning on conversations: full, LoRA or Q-LoRA",
                       description="Finetune a checkpoint on chat data (the seed's conversation JSON/JSONL, or "
                                   "OpenAI messages). Only assistant turns carry loss. The result goes to "
                                   "OUT_DIR/final: a Hugging Face checkpoint (full) or a PEFT adapter (lora, "
                                   "qlora). Any config key can be overridden as key=value (e.g. lora_r=16).")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default=None, help="what to train (default: "
                   "the config's `method`, else lora)")
    p.add_argument("--data", default=None, metavar="FILE", action="append",
                   help="SFT data file (repeatable); overrides `data:`")
    p.add_argument("--valid-data", default=None, metavar="FILE", action="append", help="held-out SFT data")
    p.add_argument("--checkpoint", default=None, metavar="CKPT", help="base model directory")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config (see configs/finetune-*.yaml)")
    p.add_argument("--out-dir", default=None, metavar="DIR", help="overrides `out_dir:`")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of stopping")
    g = p.add_argument_group("memory levers")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer in backward instead of keeping its activations")
    g.add_argument("--grad-accum", type=int, default=None, metavar="N",
                   help="gradient accumulation steps (a smaller batch_size at the same effective batch)")
    g.add_argument("--pack", action="store_true", help="pack several short conversations into each row")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (and a bf16 frozen base for lora)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. lr=1e-4")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import os

    from tianying.recipes.finetune import FinetuneConfig, run_finetune, write_summary
    from tianying.train.loop import load_config

    flags = []
    if args.method:
        flags.append(f"method={args.method}")
    if args.data:
        flags.append(f"data={json.dumps(args.data)}")
    if args.valid_data:
        flags.append(f"valid_data={json.dumps(args.valid_data)}")
    if args.checkpoint:
        flags.append(f"checkpoint={json.dumps(args.checkpoint)}")
    if args.out_dir:
        flags.append(f"out_dir={json.dumps(args.out_dir)}")
    if args.skip_bad:
        flags.append("skip_bad=true")
    if args.activation_checkpointing:
        flags.append("activation_checkpointing=true")
    if args.grad_accum:
        flags.append(f"gradient_accumulation_steps={args.grad_accum}")
    if args.pack:
        flags.append("pack=true")
    if args.bf16:
        flags.append("precision=bf16")
    cfg = load_config(FinetuneConfig, args.config, flags + list(args.overrides))
    res = run_finetune(cfg, resume=args.resume)
    write_summary(res, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        msg = f"trained to step {res.train.step}"
        if res.train.last_loss is not None:
            msg += f", loss {res.train.last_loss:.4f}"
        if res.train.val_loss is not None:
            msg += f", validation loss {res.train.val_loss:.4f}"
        if res.seconds_per_step is not None:
            msg += f", {res.seconds_per_step:.3f} s/step"
        kind = "checkpoint" if cfg.method == "full" else "PEFT adapter"
        print(f"{msg}; final {kind}: {res.final_dir}")
    return 0
