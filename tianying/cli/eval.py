"""`tianying eval CKPT --tasks ceval,mmlu,...`: benchmark a checkpoint on local copies of the eval sets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tianying.errors import TianyingError


def register(sub) -> None:
    from tianying.eval.harness import ALL_TASKS, DATA_ENV

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint (C-Eval, CMMLU, MMLU, GSM8K, HumanEval, poem_mc, perplexity)",
        description="Evaluate a checkpoint on local JSONL copies of the benchmarks. Prints a progress bar per "
                    "task and a final table (task, metric, value, stderr, n); --output writes every metric and "
                    "per-item record (prompt, choices, scores, prediction, gold) as JSON. Generated code "
                    "(HumanEval) runs only inside tianying.eval.sandbox.")
    p.add_argument("checkpoint", metavar="CKPT", nargs="?",
                   help="checkpoint directory (not needed for `--tasks humaneval --samples FILE`)")
    p.add_argument("--tasks", default=",".join(ALL_TASKS),
                   help=f"comma-separated task names or task .yaml paths (default: {','.join(ALL_TASKS)})")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="shots for the MC and GSM8K tasks (default: each task file's, 5 / 8)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N items per task (spread over subjects), N documents per language for perplexity")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per forward pass (default: 8)")
    p.add_argument("--output", default=None, metavar="FILE", help="write the full results as JSON")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help=f"directory with the task JSONL files (default: ${DATA_ENV})")
    p.add_argument("--sample-data", action="store_true",
                   help="use the few items per task bundled with the tests (source checkout; for smoke tests)")
    p.add_argument("--chat-template", nargs="?", const="auto", default=None, metavar="NAME|FILE",
                   help="wrap each prompt as a user turn of a chat template (an Aquila template name, a Jinja "
                        "file, or without a value the checkpoint's own)")
    p.add_argument("--samples", default=None, metavar="FILE",
                   help="HumanEval: score these completions (JSONL of task_id, completion) instead of generating")
    p.add_argument("--n-samples", type=int, default=1, metavar="N",
                   help="HumanEval: completions per problem; N > 1 samples at --temperature and reports pass@k")
    p.add_argument("--temperature", type=float, default=0.8, help="HumanEval sampling temperature when N > 1")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="generation budget for GSM8K / HumanEval (default: the task file's)")
    p.add_argument("--unsafe-exec", action="store_true",
                   help="HumanEval: run generated code even where no isolation (bubblewrap, unshare) works — "
                        "only rlimits and an audit hook then stand between it and your files")
    p.add_argument("--seed", type=int, default=1234, help="random seed (default: 1234, as the seed's scripts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weight dtype (default: fp32 on CPU, the checkpoint's dtype on GPU)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="quantize the weights on load")
    p.add_argument("--lora", default=None, metavar="DIR", help="apply a (PEFT-format) LoRA adapter on load")
    p.add_argument("--check-weights", action="store_true", help="refuse a checkpoint with NaN/Inf tensors")
    from tianying.cli._common import add_threads_arg

    add_threads_arg(p)
    p.set_defaults(func=run, memory_limit=None, template=None)


def run(args) -> int:
    import torch

    from tianying import threads
    from tianying.eval.harness import EvalError, EvalLM, evaluate, format_table, resolve_data_dir

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise TianyingError("--tasks is empty")
    if args.samples and not Path(args.samples).is_file():
        raise TianyingError(f"--samples file {args.samples} does not exist")
    data_dir = resolve_data_dir(args.data_dir, args.sample_data)
    torch.manual_seed(args.seed)
    lm = None
    if args.checkpoint:
        from tianying.cli._common import load_llm

        llm = load_llm(args)
        from tianying.templates import checkpoint_template

        template = None if args.chat_template is None else llm.template if args.chat_template == "auto" else \
            checkpoint_template(llm.path, llm.config, args.chat_template)
        lm = EvalLM.from_llm(llm, chat_template=template, batch_size=args.batch_size)
    elif not (args.samples and set(tasks) <= {"humaneval"}):
        raise EvalError("CKPT is required (only `--tasks humaneval --samples FILE` runs without a model)")
    res = evaluate(lm, tasks, data_dir, num_fewshot=args.num_fewshot, limit=args.limit, samples_file=args.samples,
                   n_samples=args.n_samples, temperature=args.temperature, seed=args.seed,
                   max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                   unsafe_exec=args.unsafe_exec)
    res = {"checkpoint": args.checkpoint, "config": lm.model.config.name if lm else None,
           "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size, "seed": args.seed,
           "threads": torch.get_num_threads(),
           "num_fewshot": args.num_fewshot, **res}
    print(f"chat template: {res['chat_template'] or 'none (raw prompts)'}")
    print(threads.describe())
    print(format_table(res["table"]))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding="utf-8")
        print(f"results written to {args.output}", file=sys.stderr)
    return 0
