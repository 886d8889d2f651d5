"""`tianying generate CKPT --prompt TEXT`: print only the completion on stdout."""

from __future__ import annotations

import sys

from tianying.cli._common import add_load_args, add_sampling_args, add_threads_arg, load_llm, sampling_kwargs
from tianying.errors import TianyingError


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a checkpoint",
                       description="Complete a prompt. Prints only the completion on stdout (streamed as it is "
                                   "generated, exactly the model's text: no newline is added; on a terminal one "
                                   "goes to stderr so the shell prompt starts on its own line); --temperature 0 "
                                   "(the default) is greedy decoding. Without CKPT: the default demo model "
                                   "(SmolLM2-135M-Instruct, `make demo` installs it).")
    add_load_args(p)
    p.add_argument("--prompt", default=None, help="the text to complete (default: read stdin)")
    p.add_argument("--bos", action="store_true", help="prepend the BOS token ([CLS]) to the prompt")
    add_sampling_args(p)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise TianyingError("empty prompt (give --prompt TEXT or pipe text on stdin)")
    llm = load_llm(args)
    text = ""
    for piece in llm.generate(prompt, stream=True, bos=args.bos, **sampling_kwargs(args)):
        text += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    if sys.stdout.isatty() and not text.endswith("\n"):
        sys.stderr.write("\n")  # stdout stays exactly the completion, even on a terminal
    return 0
