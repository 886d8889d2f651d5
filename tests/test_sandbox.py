"""Every escape attempt ends as a failed sample within its limit, and the host is untouched."""

from __future__ import annotations

import os
import time

import pytest

from tianying.eval.sandbox import Limits, run_python

FAST = Limits(timeout_s=5, cpu_s=3, memory_mb=512)


def test_a_correct_program_passes_and_its_output_comes_back():
    r = run_python("import math\nprint(math.factorial(5))\nassert sum(range(4)) == 6\n", FAST)
    assert r.passed, r.stderr
    assert r.stdout.strip() == "120"
    assert r.isolation  # the runner finished its setup and said which layers are in force


def test_a_failing_assertion_fails():
    r = run_python("assert 1 + 1 == 3\n", FAST)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_sys_exit_zero_before_the_tests_is_not_a_pass():
    assert run_python("import sys\nsys.exit(0)\nassert False\n", FAST).status == "failed"


def test_infinite_loop_is_killed_at_the_wall_clock_limit():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", Limits(timeout_s=1.5, cpu_s=30))
    assert r.status in ("timeout", "killed") and not r.passed
    assert time.perf_counter() - t0 < 8


def test_sleeping_forever_is_killed_at_the_wall_clock_limit():
    t0 = time.perf_counter()
    r = run_python("import time\ntime.sleep(3600)\n", Limits(timeout_s=1.0))
    assert r.status == "timeout"
    assert time.perf_counter() - t0 < 6


def test_cpu_time_limit_kills_a_busy_loop_before_the_wall_clock():
    r = run_python("while True:\n    pass\n", Limits(timeout_s=60, cpu_s=1))
    assert r.status == "killed" and r.returncode in (-9, -24)  # SIGXCPU at the soft limit, SIGKILL at the hard
    assert r.wall_s < 30


def test_fork_bomb_fails_and_leaves_no_processes():
    before = _children()
    r = run_python("import os\nwhile True:\n    os.fork()\n", FAST)
    assert not r.passed
    assert r.wall_s < FAST.timeout_s + 2
    assert _children() <= before


@pytest.mark.parametrize("code", [
    "import os\nos.system('touch {marker}')\n",
    "import subprocess\nsubprocess.run(['touch', '{marker}'])\n",
    "import os\nos.execv('/usr/bin/touch', ['touch', '{marker}'])\n",
    "import ctypes\nctypes.CDLL(None).system(b'touch {marker}')\n",
])
def test_running_commands_is_refused(tmp_path, code):
    marker = tmp_path / "pwned"
    r = run_python(code.format(marker=marker), FAST)
    assert not r.passed
    assert not marker.exists()


def test_reading_a_file_outside_the_temp_dir_fails(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    r = run_python(f"print(open({str(secret)!r}).read())\n", FAST)
    assert not r.passed
    assert "hunter2" not in r.stdout + r.stderr


def test_listing_the_callers_directory_fails(tmp_path):
    (tmp_path / "visible_name.txt").write_text("x")
    r = run_python(f"import os\nprint(os.listdir({str(tmp_path)!r}))\n", FAST)
    assert not r.passed and "visible_name" not in r.stdout


@pytest.mark.parametrize("how", ["open({p!r}, 'w').write('x')", "import os\nos.open({p!r}, os.O_CREAT | os.O_WRONLY)",
                                 "import pathlib\npathlib.Path({p!r}).write_text('x')"])
def test_writing_outside_the_temp_dir_fails(tmp_path, how):
    target = tmp_path / "written.txt"
    r = run_python(how.format(p=str(target)) + "\n", FAST)
    assert not r.passed
    assert not target.exists()


def test_deleting_a_callers_file_fails(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    r = run_python(f"import os\nos.remove({str(victim)!r})\n", FAST)
    assert not r.passed and victim.exists()


def test_files_inside_the_temp_dir_work():
    r = run_python("open('a.txt', 'w').write('ok')\nimport os\nos.mkdir('d')\nprint(open('a.txt').read())\n", FAST)
    assert r.passed, r.stderr
    assert r.stdout.strip() == "ok"


def test_huge_allocation_fails_without_harming_the_host():
    r = run_python("x = bytearray(8 * 1024 ** 3)\n", FAST)
    assert r.status == "failed" and "MemoryError" in r.stderr


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
    "import _socket\ns = _socket.socket()\ns.connect(('1.1.1.1', 80))\n",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n",
])
def test_network_access_fails(code):
    r = run_python(code, FAST)
    assert not r.passed
    assert r.wall_s < FAST.timeout_s + 2


def test_the_callers_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("TIANYING_TEST_SECRET", "s3cr3t-token")
    r = run_python("import os\nprint(dict(os.environ))\n", FAST)
    assert r.passed, r.stderr
    assert "s3cr3t-token" not in r.stdout


def test_output_flood_is_bounded():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", Limits(timeout_s=3, file_mb=1))
    assert not r.passed
    assert len(r.stdout) <= Limits().max_output


def _children() -> int:
    """Live (non-zombie) processes whose parent is this test process."""
    me, n = os.getpid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == me and stat[0] != "Z":
            n += 1
    return n

