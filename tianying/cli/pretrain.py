"""`tianying pretrain --config FILE [--resume] [key=value ...]`: train a model from indexed datasets.

Launch with torchrun for several processes (`torchrun --nproc_per_node N -m tianying pretrain ...`).
"""

from __future__ import annotations

from tianying.cli._common import add_progress_arg, add_threads_arg


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain (or continue pretraining) a model on indexed datasets",
                       description="Pretrain from a YAML config (see configs/pretrain-demo.yaml). Checkpoints go "
                                   "to OUT_DIR/checkpoints/step-N (Hugging Face layout), the final model to "
                                   "OUT_DIR/final, metrics to OUT_DIR/metrics.csv and OUT_DIR/loss.png.")
    p.add_argument("--config", required=False, default=None, metavar="FILE", help="YAML config")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in out_dir (bit-exact)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an out_dir that is not empty (its old checkpoints are kept)")
    add_progress_arg(p)
    add_threads_arg(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. lr=1e-4")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from tianying.recipes.pretrain import PretrainConfig, run_pretrain
    from tianying.train.loop import TrainingInterrupted, load_config

    switches = ["progress=false"] if args.no_progress else []
    cfg = load_config(PretrainConfig, args.config, switches + list(args.overrides))
    try:
        res = run_pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        print(f"tianying pretrain: {e}", file=sys.stderr)
        return 130
    if res.out_dir is not None:
        import os

        if int(os.environ.get("RANK", "0")) == 0:
            msg = f"trained to step {res.step}"
            if res.last_loss is not None:
                msg += f", loss {res.last_loss:.4f}"
            if res.val_loss is not None:
                import math

                msg += f", validation loss {res.val_loss:.4f} (perplexity {math.exp(min(res.val_loss, 50)):.2f})"
            from tianying.threads import describe

            print(f"{msg} on {describe()}; final model: {res.out_dir / 'final'}")
    return 0
