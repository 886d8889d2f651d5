"""`tianying <verb>`: a table of verbs, each a thin module over the Python API.

Each verb module defines `register(subparsers)`, which adds its parser and sets `func` to a function
taking the parsed args. Verbs import their heavy dependencies (torch) inside `func`, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from tianying import __version__
from tianying.errors import TianyingError

# module names under tianying.cli, in the order `--help` lists them
VERBS = ["generate", "chat", "convert", "tokenizer", "eval", "serve", "quantize", "data", "pretrain", "finetune",
         "merge_lora"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tianying",
        description="天鹰 tianying: run, train, finetune, quantize, serve and evaluate Aquila models.",
        epilog="Run `tianying VERB --help` for the options of one verb.",
    )
    parser.add_argument("--version", action="version", version=f"tianying {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERBS:
        importlib.import_module(f"tianying.cli.{name}").register(sub)
    return parser


def _cli_warnings(verb: str):  # noqa: ANN202 - the previous showwarning
    """Warnings as one line, `tianying VERB: warning: MSG`: a user needs the message, not our source line."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"tianying {verb}: warning: {message}", file=file or sys.stderr)

    previous, warnings.showwarning = warnings.showwarning, show
    return previous


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parse_args, except that key=value overrides may also follow options (`pretrain … --resume lr=1e-4`), and
    an unknown option is reported with the verb's own usage line rather than the top-level one."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
        return args
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subs.choices[args.verb].error(f"unrecognized arguments: {' '.join(extra)}")
    raise AssertionError  # error() exits


def main(argv: list[str] | None = None) -> int:
    from tianying import threads

    threads.start_load_sample()  # first: the window then spans the imports (tianying.threads)
    parser = build_parser()
    args = parse_args(parser, argv)
    previous_showwarning = _cli_warnings(args.verb)
    try:
        with threads.preserved():  # main() called from Python leaves torch's thread count as it was
            if hasattr(args, "threads"):  # every verb that computes: one policy, applied before it starts
                from tianying.cli._common import apply_threads

                apply_threads(args)
            rc = args.func(args)
    except TianyingError as e:
        print(f"tianying {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"tianying {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal bug: keep the traceback available, but not by default
        if os.environ.get("TIANYING_DEBUG"):
            raise
        print(f"tianying {args.verb}: internal error: {type(e).__name__}: {e} "
              "(set TIANYING_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = previous_showwarning  # main() called from Python leaves no trace
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
