"""README's shell commands, run as copied from a fresh clone (issue 17).

Every command of every ```bash block is classified: FAST ones run in the default suite, SLOW ones (training)
run under `-m slow`, and the rest name things a clone does not have (a user's checkpoint CKPT, /data/…, a
hostfile, a GPU cluster, a running server, an API key) or are covered elsewhere (`make`, benchmarks). A
README command that matches no class fails the test, so a new command has to be sorted here.

They run with bash in a scratch directory laid out like a clone (the tracked models/, configs/, samples/,
tianying/ linked in), where `tianying` and `.venv/bin/tianying` are this checkout's CLI. Training commands get
extra `key=value` overrides appended (SHORTEN) so that a 3,000-step config finishes in seconds; nothing else
is changed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (regex on the command, ...) — first match wins
NOT_FROM_A_CLONE = [
    r"\bCKPT\b", r"/data/", r"/path/to", r"\$KEY", r"\$LLAMA_CPP_DIR", r"hostfile", r"^torchrun ", r"^N=\$",
    r"^for i in", r"^curl ", r"^make ", r"^NO_BROWSER_INSTALL=", r"^pip install", r"^export ", r"benchmarks/",
    r"^tianying serve ", r"\./aquila", r"\./AquilaChat", r"aquilachat2-7b", r"completions\.jsonl",
    r"OMP_NUM_THREADS=", r"TIANYING_QUANT_BACKEND=", r"shared/data", r"^tianying eval models/demo",
]
FAST = [
    r"^\.venv/bin/tianying (generate|--help)", r"^printf .*\| \.venv/bin/tianying chat models/demo-chat$",
    r"^tianying quantize models/demo out/demo-int8 ", r"^tianying generate out/demo-int8 ",
    r"^tianying tokenizer (train|stats) ",
]
# no checkpoint: the default model (requirements-demo.txt), run with the fast ones where it is installed
DEMO = [r"(^|\| )(\.venv/bin/)?tianying (chat|generate|serve)( --|\s*$|\s+#)"]
SLOW = [r"^tianying data index ", r"^tianying pretrain ", r"^tianying finetune ", r"^tianying chat runs/",
        r"^tianying chat models/demo(-chat-lora|-chat)?( |$)", r"^tianying merge-lora "]
SHORTEN = {"pretrain": "max_steps=2 batch_size=4 eval_interval=1 eval_iters=1 save_interval=1",
           "finetune": "max_steps=2 batch_size=4 eval_interval=2 eval_iters=1 save_interval=1"}


def readme_commands() -> list[tuple[int, str]]:
    """(line, command) for each command of README's bash blocks: continuation lines joined, comment-only lines
    and multi-line shell constructs (a `for` loop: one command from `for` to `done`) kept whole."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        first = text[:m.start()].count("\n") + 2
        lines = m.group(1).splitlines()
        i = 0
        while i < len(lines):
            start, cmd = first + i, lines[i]
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1] + " " + lines[i].strip()
            if cmd.startswith("for "):
                while not lines[i].startswith("done") and i + 1 < len(lines):
                    i += 1
                    cmd += "\n" + lines[i]
            i += 1
            if cmd.strip() and not cmd.lstrip().startswith("#"):
                out.append((start, cmd.strip()))
    return out


def classify(cmd: str) -> str | None:
    for kind, patterns in (("skip", NOT_FROM_A_CLONE), ("demo", DEMO), ("fast", FAST), ("slow", SLOW)):
        if any(re.search(p, cmd) for p in patterns):
            return kind
    return None


def test_default_model_commands_are_recognised():
    assert classify("printf 'Hi\\n' | .venv/bin/tianying chat --echo") == "demo"
    assert classify("tianying generate --prompt x") == "demo"
    assert classify("tianying chat   # the default model") == "demo"
    assert classify("tianying serve   # the default model") == "skip"  # servers are not started here
    assert classify("tianying chat models/demo-chat --echo") != "demo"


def test_every_readme_command_is_classified():
    cmds = readme_commands()
    assert len(cmds) > 40  # the extraction found the blocks
    assert [(n, c) for n, c in cmds if classify(c) is None] == []
    assert sum(classify(c) == "fast" for _, c in cmds) >= 5 and sum(classify(c) == "slow" for _, c in cmds) >= 10


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A scratch directory shaped like a fresh clone, with `tianying` on PATH."""
    d = tmp_path_factory.mktemp("clone")
    for name in ("configs", "samples", "tianying", "tests"):
        (d / name).symlink_to(ROOT / name)
    (d / "models").mkdir()  # commands write new models there (merge-lora): never into this checkout
    for m in (ROOT / "models").iterdir():
        (d / "models" / m.name).symlink_to(m)
    bindir = d / ".venv" / "bin"
    bindir.mkdir(parents=True)
    shim = bindir / "tianying"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tianying "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "2"}
    return d, env


def run_commands(clone, kind: str, timeout: int) -> None:
    d, env = clone
    ran = 0
    for line, cmd in readme_commands():
        if classify(cmd) != kind:
            continue
        verb = cmd.split()[1] if cmd.startswith("tianying ") else None
        if verb in SHORTEN:  # appended after the command, before its comment
            code, _, _ = cmd.partition("  #")
            cmd = f"{code.rstrip()} {SHORTEN[verb]}"
        r = subprocess.run(["bash", "-c", cmd], cwd=d, env=env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"README.md:{line}: {cmd}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, f"README.md:{line}: {cmd}\n{r.stderr[-3000:]}"
        ran += 1
    return ran


def test_fast_readme_commands_run_as_copied(clone):
    assert run_commands(clone, "fast", timeout=300)
    from tianying.demo import default_model

    if default_model() is not None:
        run_commands(clone, "demo", timeout=300)


@pytest.mark.slow
def test_slow_readme_commands_run_as_copied(clone):
    """Tokenizer → index → pretrain → resume, the three finetunes, chat/merge on their outputs (~5 min)."""
    run_commands(clone, "fast", timeout=300)  # the tokenizer the pretraining commands use
    assert run_commands(clone, "slow", timeout=600)
