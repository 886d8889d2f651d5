"""`tianying finetune --method full|lora|qlora|dpo --data FILE --checkpoint CKPT [--config FILE] [key=value ...]`."""

from __future__ import annotations

from tianying.cli._common import add_progress_arg, add_threads_arg


def register(sub) -> None:
    p = sub.add_parser("finetune", help="supervised finetuning on conversations: full, LoRA or Q-LoRA",
                       description="Finetune a checkpoint on chat data (the seed's conversation JSON/JSONL, or "
                                   "OpenAI messages). Only assistant turns carry loss. The result goes to "
                                   "OUT_DIR/final: a Hugging Face checkpoint (full) or a PEFT adapter (lora, "
                                   "qlora). Any config key can be overridden as key=value (e.g. lora_r=16).")
    p.add_argument("--method", choices=["full", "lora", "qlora", "dpo"], default=None, help="what to train "
                   "(default: the config's `method`, else lora); dpo: preference training on chosen/rejected pairs")
    p.add_argument("--data", default=None, metavar="FILE", action="append",
                   help="SFT data file (repeatable); overrides `data:`")
    p.add_argument("--valid-data", default=None, metavar="FILE", action="append", help="held-out SFT data")
    p.add_argument("--checkpoint", default=None, metavar="CKPT", help="base model directory")
    p.add_argument("--config", default=None, metavar="FILE", help="YAML config (see configs/finetune-*.yaml)")
    p.add_argument("--out-dir", default=None, metavar="DIR", help="overrides `out_dir:`")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an out_dir that is not empty (its old checkpoints are kept)")
    p.add_argument("--chat-template", default=None, metavar="NAME|FILE",
                   help="an Aquila template name or a Jinja file (default: the checkpoint's own); "
                        "overrides `template:`")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of stopping")
    p.add_argument("--columns", default=None, metavar="OURS=THEIRS,...",
                   help="dataset column names, e.g. prompt=question,chosen=good,rejected=bad")
    d = p.add_argument_group("preference training (--method dpo)")
    d.add_argument("--policy", choices=["full", "lora", "qlora"], default=None,
                   help="how the policy trains (default lora); the reference is the starting checkpoint")
    d.add_argument("--dpo-loss", choices=["sigmoid", "ipo", "simpo"], default=None,
                   help="sigmoid (DPO, default), ipo, or simpo (reference-free)")
    d.add_argument("--beta", type=float, default=None, help="β (default 0.1)")
    d.add_argument("--precompute-ref", action="store_true",
                   help="score all pairs with the reference once before training (no reference forward per step)")
    g = p.add_argument_group("memory levers")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each layer in backward instead of keeping its activations")
    g.add_argument("--grad-accum", type=int, default=None, metavar="N",
                   help="gradient accumulation steps (a smaller batch_size at the same effective batch)")
    g.add_argument("--pack", action="store_true", help="pack several short conversations into each row")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (and a bf16 frozen base for lora)")
    add_progress_arg(p)
    add_threads_arg(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. lr=1e-4")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import os
    import sys

    from tianying.recipes.finetune import FinetuneConfig, run_finetune, write_summary
    from tianying.train.loop import TrainingInterrupted, load_config

    # command-line flags as config overrides (key=value, as after --config); later overrides win
    values = {"method": args.method, "data": args.data, "valid_data": args.valid_data,
              "checkpoint": args.checkpoint, "out_dir": args.out_dir, "gradient_accumulation_steps": args.grad_accum,
              "template": args.chat_template, "columns": args.columns, "policy": args.policy,
              "dpo_loss": args.dpo_loss, "beta": args.beta}
    flags = [f"{k}={v if k in ('method', 'policy', 'dpo_loss') else json.dumps(v)}"
             for k, v in values.items() if v is not None]
    switches = {"skip_bad=true": args.skip_bad, "activation_checkpointing=true": args.activation_checkpointing,
                "pack=true": args.pack, "precision=bf16": args.bf16, "precompute_ref=true": args.precompute_ref,
                "progress=false": args.no_progress}
    flags += [flag for flag, on in switches.items() if on]
    cfg = load_config(FinetuneConfig, args.config, flags + list(args.overrides))
    try:
        res = run_finetune(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        print(f"tianying finetune: {e}", file=sys.stderr)
        return 130
    write_summary(res, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        msg = f"trained to step {res.train.step}"
        if res.train.last_loss is not None:
            msg += f", loss {res.train.last_loss:.4f}"
        if res.train.val_loss is not None:
            msg += f", validation loss {res.train.val_loss:.4f}"
        if res.seconds_per_step is not None:
            msg += f", {res.seconds_per_step:.3f} s/step"
        from tianying.threads import describe

        msg += f" on {describe()}"
        if cfg.method == "dpo":
            pref = (json.loads((res.train.out_dir / "finetune_summary.json").read_text()).get("preference")
                    or {}).get("last")
            if pref:
                msg += (f", reward margin {pref['reward_margin']:.4f}, reward accuracy {pref['reward_acc']:.2f} "
                        f"(margin curve: {res.train.out_dir / 'margins.png'})")
        kind = "checkpoint" if cfg.weights == "full" else "PEFT adapter"
        print(f"{msg}; final {kind}: {res.final_dir}")
    return 0
