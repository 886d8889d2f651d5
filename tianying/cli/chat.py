"""`tianying chat CKPT`: interactive chat on a terminal; one reply per input line from a pipe."""

from __future__ import annotations

import sys

from tianying.cli._common import add_load_args, add_sampling_args, add_threads_arg, load_llm, sampling_kwargs


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a checkpoint (interactive, or one reply per stdin line)",
                       description="Chat using the checkpoint's conversation template. On a terminal: type a "
                                   "message, the reply streams; Ctrl-C stops a reply (the history is kept), "
                                   "/reset clears the history, /exit or Ctrl-D quits. With stdin from a pipe: "
                                   "each input line is one user turn and each reply is printed on one line "
                                   "(newlines inside a reply are written as \\n). Without CKPT: the default "
                                   "demo model (SmolLM2-135M-Instruct, `make demo` installs it).")
    add_load_args(p)
    p.add_argument("--chat-template", "--template", dest="template", default=None, metavar="NAME|FILE",
                   help="conversation template: aquila-chat, aquila, aquila-v1, aquila-legacy, aquila-v2, or a "
                        "Jinja file (default: the checkpoint's own)")
    p.add_argument("--system", default=None, help="a system message replacing the template's system text")
    p.add_argument("--no-history", action="store_true", help="answer each message on its own")
    p.add_argument("--echo", action="store_true",
                   help="with stdin from a pipe, print each message ('> ' first) above its reply")
    add_sampling_args(p, max_new_tokens=512)
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    llm = load_llm(args)
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    if interactive:
        from tianying.threads import describe

        print(f"tianying chat — {llm.path} (template {llm.template}, {describe()}); Ctrl-C stops a reply, "
              "/reset, /exit", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("你> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:  # like a shell: drop the line being typed, ask again
                print("\n(Ctrl-D or /exit quits)", file=sys.stderr)
                continue
        else:
            line = sys.stdin.readline()
            if not line:
                return 0
            line = line.rstrip("\n")
        if interactive and line.strip() in ("/exit", "/quit"):
            return 0
        if interactive and line.strip() == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + history
        messages.append({"role": "user", "content": line})
        if not interactive and args.echo:
            sys.stdout.write("> " + line + "\n")
        reply = ""
        if interactive:
            sys.stdout.write("鹰> ")
        stream = llm.chat(messages, stream=True, **sampling_kwargs(args))
        try:
            for piece in stream:
                reply += piece
                if interactive:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            # stop this reply only: the turn is dropped, the conversation before it is kept
            sys.stdout.write("\n")
            print("(reply stopped; this turn is not kept in the history)", file=sys.stderr)
            continue
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if interactive:
            sys.stdout.write("\n")
        else:
            sys.stdout.write(reply.replace("\\", "\\\\").replace("\n", "\\n") + "\n")
        sys.stdout.flush()
        if not args.no_history:
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
