"""Every escape attempt ends as a failed sample within its limit, and the host is untouched.

The attacks run under each isolation backend this machine has (bwrap, unshare), most of them with the audit
hook switched off (`hook=False`): what they prove is that the kernel-enforced layer holds on its own.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tianying.eval import sandbox
from tianying.eval.sandbox import BACKENDS, Limits, SandboxUnavailable, run_python

FAST = Limits(timeout_s=5, cpu_s=3, memory_mb=512)
HERE = [b for b in BACKENDS if sandbox.probe(b) is None]
ROOT = os.geteuid() == 0
# without bwrap or unshare only the fail-closed tests run; `make test` installs bubblewrap
NONE_HERE = pytest.param(None, marks=pytest.mark.skip(
    reason=f"no isolation on this machine ({'; '.join(filter(None, map(sandbox.probe, BACKENDS)))})"))


@pytest.fixture(params=HERE or [NONE_HERE])
def backend(request):
    return request.param


needs_isolation = pytest.mark.skipif(not HERE, reason="no isolation on this machine")


def run(code, backend, limits=FAST, **kw):
    return run_python(code, limits, backend=backend, **kw)


# ------------------------------------------------------------------------------------------- basics
def test_a_correct_program_and_its_tests_pass_and_the_output_comes_back(backend):
    r = run("import math\nprint(math.factorial(5))\ndef f(x):\n    return x / 2\n", backend,
            test="assert f(4) == 2\nassert abs(f(1) - 0.5) < 1e-9\nassert f(2) in [1, 2]\n"
                 "assert type(f(2)) == float\nprint('tested')\n")
    assert r.passed, r.stderr
    assert r.stdout.split() == ["120", "tested"]
    assert r.isolation["backend"] == backend and r.isolation["namespaces"]
    if ROOT:
        assert r.isolation["user"].startswith("nobody")


def test_a_syntax_error_fails_after_the_setup_report(backend):
    r = run("def f(:\n", backend, test="assert f() == 1\n")
    assert r.status == "failed" and "SyntaxError" in r.stderr and r.isolation["backend"] == backend


def test_a_failing_assertion_fails(backend):
    r = run("def f(x):\n    return x + 1\n", backend, test="assert f(1) == 3\n")
    assert r.status == "failed" and "AssertionError" in r.stderr


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n",
                                  "import os\nos.kill(os.getpid(), 9)\n", "raise SystemExit\n"])
def test_leaving_before_the_tests_is_not_a_pass(backend, code):
    # the exit status is 0 for the first, but the run's token was never printed
    r = run(code + "def f():\n    return 1\n", backend, test="assert f() == 2\n")
    assert r.status != "passed"
    r = run(code, backend)
    assert r.status != "passed"


def test_an_always_equal_object_does_not_pass(backend):
    code = ("class Any:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
            "    __sub__ = lambda s, o: s\n    __abs__ = lambda s: 0\n    __lt__ = lambda s, o: True\n"
            "    __bool__ = lambda s: True\n    __hash__ = lambda s: 0\n"
            "class Int(int):\n    __eq__ = lambda s, o: True\n"
            "def f(x):\n    return Any()\ndef g(x):\n    return Int(7)\ndef h(x):\n    return [Any()]\n")
    for test in ("assert f(1) == 2\n", "assert f(1) < 2\n", "assert g(1) == 2\n", "assert h(1) == [2]\n",
                 "assert 2 == f(1)\n", "assert not (f(1) != 2)\n"):
        r = run(code, backend, test=test)
        assert r.status == "failed", test
        assert "not plain data" in r.stderr, (test, r.stderr)
    # HumanEval's tests call the function under test `candidate`: what it returns must be plain data
    test = "def check(candidate):\n    assert abs(candidate(1) - 0.5) < 1e-6\ncheck(f)\n"
    r = run(code, backend, test=test)
    assert r.status == "failed" and "the candidate returned a Any" in r.stderr, r.stderr
    r = run("def f(x):\n    return x / 2\n", backend, test=test)
    assert r.passed, r.stderr


def test_patching_builtins_or_planting_modules_does_not_fake_the_tests(backend):
    r = run("import builtins\nbuiltins.abs = lambda x: 0\ndef f(x):\n    return 99.0\n", backend,
            test="assert abs(f(1) - 0.5) < 1e-6\n")
    assert r.status == "failed"
    r = run("import sys, types\nm = types.ModuleType('math')\nm.isclose = lambda *a, **k: True\n"
            "sys.modules['math'] = m\ndef f(x):\n    return 99.0\n", backend,
            test="import math\nassert math.isclose(f(1), 0.5)\n")
    assert r.status == "failed"


def test_the_token_cannot_be_read_or_forged_through_file_descriptors(backend):
    # read every descriptor it might have inherited and echo everything (plus a fake pass) to every one
    code = ("import os\ndata = b''\nfor fd in range(64):\n    try:\n        data += os.read(fd, 4096)\n"
            "    except OSError:\n        pass\nfor fd in range(64):\n    try:\n"
            "        os.write(fd, b'\\n' + data + b'\\npassed\\n' + data.replace(b'\"', b''))\n"
            "    except OSError:\n        pass\n")
    for hook in (True, False):
        r = run(code + "def f():\n    return 1\n", backend, test="assert f() == 2\n", hook=hook)
        assert r.status == "failed", hook


def test_the_runners_frames_are_out_of_reach(backend):
    code = ("import sys\ntry:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
            "    print(e.__traceback__.tb_frame.f_back.f_locals)\n")
    r = run(code, backend)
    assert r.status == "failed" and "tb_frame is not allowed" in r.stderr
    for code in ("import sys\nprint(sys._getframe(1).f_locals)\n", "import gc\nprint(len(gc.get_objects()))\n"):
        r = run(code, backend)
        assert r.status == "failed" and "not allowed" in r.stderr


def test_threads_left_running_before_the_tests_fail(backend):
    r = run("import threading, time\nthreading.Thread(target=time.sleep, args=(3,)).start()\n"
            "def f():\n    return 1\n", backend, test="assert f() == 1\n")
    assert r.status == "failed" and "threads" in r.stderr


# ------------------------------------------------------------------------------------------- the OS layer
def test_the_old_hook_bypass_does_not_help(backend, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    r = run(f"import sys\nsys.modules['__main__'].busy[0] = True\nprint(open({str(secret)!r}).read())\n", backend)
    assert not r.passed and "hunter2" not in r.stdout + r.stderr


@pytest.mark.parametrize("hook", [True, False])
def test_reading_a_file_outside_fails(backend, tmp_path, hook):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    r = run(f"print(open({str(secret)!r}).read())\n", backend, hook=hook)
    assert not r.passed
    assert "hunter2" not in r.stdout + r.stderr


@pytest.mark.skipif(not ROOT, reason="as a non-root caller the program runs as the caller (documented)")
def test_a_root_only_file_is_unreadable_even_where_it_is_mounted(backend, tmp_path):
    tmp_path.chmod(0o755)
    public, secret = tmp_path / "public.txt", tmp_path / "secret.txt"
    public.write_text("hello")
    secret.write_text("hunter2")
    secret.chmod(0o600)
    code = f"print(open({str(public)!r}).read())\nprint(open({str(secret)!r}).read())\n"
    r = run(code, backend, hook=False, expose=[str(tmp_path)])
    assert r.stdout.strip() == "hello"  # the directory is there; only the uid stops the second read
    assert not r.passed and "Permission denied" in r.stderr and "hunter2" not in r.stdout


def test_other_processes_argv_and_the_host_are_invisible(backend):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--api-key=s3cr3t-arg"])
    try:
        code = ("import os\nseen = []\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
                "        try:\n            seen.append(open(f'/proc/{p}/cmdline', 'rb').read())\n"
                "        except OSError:\n            pass\nprint(sorted(os.listdir('/')))\n"
                "print(len(seen), [c[:40] for c in seen], any(b's3cr3t' in c for c in seen))\n")
        r = run(code, backend, hook=False)
        assert r.passed, r.stderr
        assert "s3cr3t-arg" not in r.stdout
        top, procs = r.stdout.splitlines()
        assert 1 <= int(procs.split()[0]) <= 2 and procs.endswith("False")  # its own namespace: init and itself
        python_top = os.path.realpath(sys.base_prefix).split("/")[1]  # /root/.pyenv/... on this machine
        allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "proc", "dev", "tmp", python_top}
        assert set(ast.literal_eval(top)) <= allowed  # no /etc, /home, /work, the caller's /tmp, ...
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("how", ["os.kill(os.getppid(), 9)", "os.kill({victim}, 9)", "os.kill(-1, 9)",
                                 "os.killpg(os.getpgid(0), 9)"])
def test_killing_the_evaluator_or_other_processes_fails(backend, how):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code = "import os\ntry:\n    " + how.format(victim=victim.pid) + "\nexcept OSError as e:\n    print(e)\n"
        r = run(code + "def f():\n    return 1\n", backend, hook=False, test="assert f() == 2\n")
        assert not r.passed
        assert victim.poll() is None  # still running, and so is this test process
    finally:
        victim.kill()
        victim.wait()


def test_a_fork_bomb_is_bounded_and_leaves_no_processes(backend):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = run(code, backend, Limits(timeout_s=3, cpu_s=3, processes=16), hook=False)
    assert not r.passed
    assert r.wall_s < 10
    time.sleep(0.2)
    assert _processes_with(r.run_id) == []


def test_a_setsid_daemon_does_not_outlive_the_run(backend):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        os.execv('/bin/sleep', ['sleep', '313.37'])\n    os._exit(0)\ntime.sleep(0.5)\nprint('spawned')\n")
    r = run(code, backend, hook=False)
    assert r.passed and r.stdout.strip() == "spawned", r.stderr  # it really started the daemon
    time.sleep(0.3)
    assert _processes_with("313.37") == [] and _processes_with(r.run_id) == []


def test_a_killed_evaluator_takes_the_sandbox_with_it(backend, tmp_path):
    script = (f"import sys\nsys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
              "from tianying.eval.sandbox import Limits, run_python\n"
              "run_python(\"import os\\nos.execv('/bin/sleep', ['sleep', '271.828'])\\n\", Limits(timeout_s=600),"
              f" backend={backend!r}, hook=False)\n")
    evaluator = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 30
    while not _processes_with("271.828") and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_with("271.828"), "the sandboxed program never started"
    evaluator.kill()
    evaluator.wait()
    deadline = time.time() + 10
    while _processes_with("271.828") and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_with("271.828") == []


@pytest.mark.parametrize("code", [
    "import os\nos.system('touch {marker}')\n",
    "import subprocess\nsubprocess.run(['touch', '{marker}'], check=True)\n",
    "import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])\n",
    "import ctypes\nctypes.CDLL(None).system(b'touch {marker}')\n",
])
@pytest.mark.parametrize("hook", [True, False])
def test_commands_cannot_touch_the_host(backend, tmp_path, code, hook):
    marker = tmp_path / "pwned"
    r = run(code.format(marker=marker), backend, hook=hook)
    assert not marker.exists()
    if hook:
        assert not r.passed


def test_listing_the_callers_directory_fails(backend, tmp_path):
    (tmp_path / "visible_name.txt").write_text("x")
    for hook in (True, False):
        r = run(f"import os\nprint(os.listdir({str(tmp_path)!r}))\n", backend, hook=hook)
        assert not r.passed and "visible_name" not in r.stdout


@pytest.mark.parametrize("where", ["{tmp}/written.txt", "/usr/written-by-sandbox.txt"])
def test_writing_outside_the_private_tmp_fails(backend, tmp_path, where):
    target = where.format(tmp=tmp_path)
    for hook in (True, False):
        r = run(f"open({target!r}, 'w').write('x')\n", backend, hook=hook)
        assert not r.passed
        assert not os.path.exists(target)


def test_tempfile_works(backend):
    r = run("import tempfile\nwith tempfile.TemporaryFile() as f:\n    f.write(b'ok')\n    f.seek(0)\n"
            "    print(f.read().decode())\n", backend)
    assert r.passed and r.stdout.strip() == "ok", r.stderr


def test_files_in_the_private_tmp_work_and_vanish(backend):
    r = run("open('a.txt', 'w').write('ok')\nimport os\nos.mkdir('d')\nprint(open('a.txt').read(), os.getcwd())\n",
            backend)
    assert r.passed, r.stderr
    assert r.stdout.split() == ["ok", "/tmp"]
    assert not os.path.exists("/tmp/a.txt") or open("/tmp/a.txt").read() != "ok"


def test_the_private_tmp_is_bounded(backend):
    code = "import os\nfor i in range(100):\n    open(f'f{i}', 'wb').write(os.urandom(1 << 20))\n"
    r = run(code, backend, Limits(timeout_s=10, file_mb=2), hook=False)
    assert r.status == "failed" and ("No space left" in r.stderr or "File too large" in r.stderr), r.stderr


def test_huge_allocation_fails_without_harming_the_host(backend):
    r = run("x = bytearray(8 * 1024 ** 3)\n", backend)
    assert r.status == "failed" and "MemoryError" in r.stderr


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
    "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('1.1.1.1', 80))\n",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n",
])
@pytest.mark.parametrize("hook", [True, False])
def test_network_access_fails(backend, code, hook):
    r = run(code, backend, hook=hook)
    assert not r.passed
    assert r.wall_s < FAST.timeout_s + 2


def test_infinite_loop_is_killed_at_the_wall_clock_limit(backend):
    t0 = time.perf_counter()
    r = run("while True:\n    pass\n", backend, Limits(timeout_s=1.5, cpu_s=30))
    assert r.status in ("timeout", "killed") and not r.passed
    assert time.perf_counter() - t0 < 8


def test_sleeping_forever_is_killed_at_the_wall_clock_limit(backend):
    t0 = time.perf_counter()
    r = run("import time\ntime.sleep(3600)\n", backend, Limits(timeout_s=1.0))
    assert r.status == "timeout"
    assert time.perf_counter() - t0 < 6
    assert _processes_with(r.run_id) == []


def test_cpu_time_limit_kills_a_busy_loop_before_the_wall_clock(backend):
    r = run("while True:\n    pass\n", backend, Limits(timeout_s=60, cpu_s=1))
    # bwrap reports the signal (128 + 9 / 24); util-linux 2.38's unshare exits 1 after a killed child
    assert r.status == ("killed" if backend == "bwrap" else "failed")
    assert r.wall_s < 30


def test_the_callers_environment_is_not_visible(backend, monkeypatch):
    monkeypatch.setenv("TIANYING_TEST_SECRET", "s3cr3t-token")
    r = run("import os\nprint(dict(os.environ))\n", backend)
    assert r.passed, r.stderr
    assert "s3cr3t-token" not in r.stdout


def test_output_flood_is_bounded(backend):
    r = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", backend, Limits(timeout_s=3, file_mb=1))
    assert not r.passed
    assert len(r.stdout) <= Limits().max_output


# ------------------------------------------------------------------------------------------- failing closed
def test_no_isolation_fails_closed_with_one_line_unless_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "_PROBED", {})
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.delenv("TIANYING_SANDBOX", raising=False)
    with pytest.raises(SandboxUnavailable) as e:
        run_python("print(1)\n", FAST)
    msg = str(e.value)
    assert "\n" not in msg and "bubblewrap" in msg and "--unsafe-exec" in msg
    r = run_python("print(1)\n", FAST, unsafe=True)
    assert r.passed and r.isolation["backend"] == "none" and not r.isolation["namespaces"]
    r = run_python("import os\nos._exit(0)\n", FAST, unsafe=True)  # the token still decides
    assert not r.passed


def test_tianying_eval_refuses_humaneval_without_isolation_unless_unsafe_exec(monkeypatch, tmp_path, capsys):
    import json

    from tianying.cli import main
    from tianying.eval.harness import load_jsonl

    sample = Path(__file__).parent / "data" / "eval"
    p = load_jsonl(sample / "humaneval.jsonl")[0]
    f = tmp_path / "samples.jsonl"
    f.write_text(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n")
    monkeypatch.setattr(sandbox, "_PROBED", {})
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.delenv("TIANYING_SANDBOX", raising=False)
    args = ["eval", "--tasks", "humaneval", "--samples", str(f), "--data-dir", str(sample), "--no-progress",
            "--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot isolate generated code" in err and "--unsafe-exec" in err
    assert not (tmp_path / "r.json").exists()
    assert main(args + ["--unsafe-exec"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["tasks"]["humaneval"]["metrics"]["pass@1"]["value"] == 1.0
    assert res["tasks"]["humaneval"]["info"]["sandbox"]["backend"] == "none"


@needs_isolation
def test_humaneval_scores_cheating_completions_as_failures(tmp_path):
    import json

    from tianying.eval.harness import evaluate, load_jsonl

    sample = Path(__file__).parent / "data" / "eval"
    p = load_jsonl(sample / "humaneval.jsonl")[0]
    cheats = ["    import os\n    os._exit(0)\n",
              "    class A:\n        __eq__ = lambda s, o: True\n    return A()\n",
              "    import sys\n    sys.exit(0)\n"]
    rows = [{"task_id": p["task_id"], "completion": c} for c in cheats]
    rows.append({"task_id": p["task_id"], "completion": p["canonical_solution"]})
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate(None, ["humaneval"], sample, samples_file=str(f), progress=False)
    recs = res["tasks"]["humaneval"]["samples"]
    assert [r["passed"] for r in recs] == [False, False, False, True], recs


def _processes_with(needle: str) -> list[int]:
    """Host processes whose command line contains `needle` (zombies included: they still hold a pid)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmd:
            out.append(int(pid))
    return out
