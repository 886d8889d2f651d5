"""The thread policy (tianying.threads) on fake topologies, and `--threads` on every verb that computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tianying import threads
from tianying.cli import build_parser, main
from tianying.errors import TianyingError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"
SYS = "/sys/devices/system/cpu"


def fake_machine(monkeypatch, files: dict[str, str], cpus: set[int], busy: float | None = 0.0) -> None:
    """The /sys and /proc reader answers from `files` only; the process may use `cpus`; other processes keep
    `busy` CPUs busy (None: no /proc/stat)."""
    monkeypatch.setattr(threads, "_read", lambda path: files.get(path))
    monkeypatch.setattr(threads, "_affinity", lambda: set(cpus))
    monkeypatch.setattr(threads, "_others_busy", lambda c: busy)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def smt_topology(n_cores: int, smt: int = 2) -> dict[str, str]:
    """Linux numbering: logical CPU c + k·n_cores is the k-th hyperthread of core c."""
    files = {}
    for core in range(n_cores):
        siblings = ",".join(str(core + k * n_cores) for k in range(smt))
        for k in range(smt):
            files[f"{SYS}/cpu{core + k * n_cores}/topology/thread_siblings_list"] = siblings
    return files


def test_cpu_list_format():
    assert threads._cpu_list("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert threads._cpu_list("5") == {5}


def test_physical_cores_count_smt_siblings_once(monkeypatch):
    fake_machine(monkeypatch, smt_topology(4), set(range(8)))
    assert threads.physical_cores(set(range(8))) == 4
    assert threads.physical_cores({0, 4}) == 1  # both hyperthreads of core 0
    assert threads.physical_cores({0, 1, 2, 3}) == 4  # one thread of each core
    files = {f"{SYS}/cpu{c}/topology/thread_siblings_list": "0-1" if c < 2 else "2-3" for c in range(4)}
    fake_machine(monkeypatch, files, set(range(4)))  # the other numbering: siblings adjacent
    assert threads.physical_cores({0, 1, 2, 3}) == 2


def test_no_topology_falls_back_to_the_cpus_we_may_use(monkeypatch):
    fake_machine(monkeypatch, {}, {0, 1, 2}, busy=None)  # no /sys, no /proc (macOS, some sandboxes)
    assert threads.default_threads() == (3, "3 physical cores")


def test_default_is_physical_cores_of_the_affinity_mask(monkeypatch):
    fake_machine(monkeypatch, smt_topology(8), set(range(16)))
    assert threads.default_threads() == (8, "8 physical cores")
    fake_machine(monkeypatch, smt_topology(8), {0, 1, 8, 9})  # taskset -c 0,1,8,9: two cores
    assert threads.default_threads() == (2, "2 physical cores")
    fake_machine(monkeypatch, smt_topology(8), {3})
    assert threads.default_threads() == (1, "1 physical core")


def test_ranks_of_one_machine_share_its_cores(monkeypatch):
    """Processes of a distributed run on one machine (forked, or launched without torchrun's OMP_NUM_THREADS)
    split the cores instead of each taking all of them."""
    fake_machine(monkeypatch, smt_topology(8), set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.default_threads() == (2, "8 physical cores shared by 4 local ranks")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert threads.default_threads()[0] == 8  # a world size alone says nothing about this machine
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert threads.default_threads()[0] == 1


@pytest.mark.parametrize("cpu_max, expected", [("max 100000", 4), ("150000 100000", 1), ("200000 100000", 2),
                                               ("800000 100000", 4), ("50000 100000", 1)])
def test_cgroup_v2_quota_caps_the_default(monkeypatch, cpu_max, expected):
    files = {**smt_topology(4, smt=1), "/proc/self/cgroup": "0::/", "/sys/fs/cgroup/cpu.max": cpu_max}
    fake_machine(monkeypatch, files, set(range(4)))
    n, why = threads.default_threads()
    assert n == expected
    assert ("CPU quota" in why) == (expected < 4)


def test_quota_of_a_parent_cgroup_applies(monkeypatch):
    files = {"/proc/self/cgroup": "0::/user.slice/job.scope", "/sys/fs/cgroup/user.slice/job.scope/cpu.max":
             "max 100000", "/sys/fs/cgroup/user.slice/cpu.max": "300000 100000", "/sys/fs/cgroup/cpu.max": "max"}
    fake_machine(monkeypatch, files, set(range(8)))
    assert threads.cpu_quota() == 3.0
    files = {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "250000", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"}
    fake_machine(monkeypatch, files, set(range(8)))  # cgroup v1
    assert threads.cpu_quota() == 2.5
    files["/sys/fs/cgroup/cpu/cpu.cfs_quota_us"] = "-1"  # v1's "no limit"
    assert threads.cpu_quota() is None


@pytest.mark.parametrize("busy, expected", [(0.0, 4), (0.4, 4), (0.6, 3), (1.0, 3), (2.49, 2), (3.6, 1), (4.0, 1)])
def test_cores_other_processes_keep_busy_are_left_to_them(monkeypatch, busy, expected):
    fake_machine(monkeypatch, smt_topology(4, smt=1), set(range(4)), busy=busy)
    n, why = threads.default_threads()
    assert n == expected
    assert ("kept busy by other processes" in why) == (expected < 4)


def test_busy_cpus_from_two_proc_stat_samples():
    # 2 CPUs, 100 ticks each elapsed; 150 busy ticks in all, 50 of them ours → others used 1.0 CPU
    before = ({0: (1000, 5000), 1: (2000, 5000)}, 300)
    after = ({0: (1100, 5100), 1: (2050, 5100)}, 350)
    assert threads.busy_cpus(before, after) == pytest.approx(1.0)
    assert threads.busy_cpus(before, ({0: (1000, 5100), 1: (2000, 5100)}, 310)) == 0.0  # never negative


def test_proc_stat_parsing(monkeypatch):
    files = {"/proc/stat": "cpu  9 9 9 9 9 9 9 9 0 0\n"
                           "cpu0 10 1 5 100 4 1 1 2 0 0\ncpu1 20 0 10 50 0 0 0 0 0 0\nintr 5 6\n",
             "/proc/self/stat": "4242 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 17 3 0 0 20 0 1 0"}
    monkeypatch.setattr(threads, "_read", lambda path: files.get(path))
    ticks, own = threads._cpu_ticks({0})  # cpu1 is not ours
    assert ticks == {0: (10 + 1 + 5 + 1 + 1 + 2, 124)}  # busy: all but idle and iowait
    assert own == 17 + 3  # utime + stime, after a process name with spaces and parentheses


def test_omp_num_threads_is_honoured(monkeypatch):
    fake_machine(monkeypatch, smt_topology(4, smt=1), set(range(4)), busy=3.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.resolve() == (3, "OMP_NUM_THREADS")  # over the load cap: the user said so
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")  # nested levels: the first is ours
    assert threads.resolve() == (2, "OMP_NUM_THREADS")
    assert threads.resolve(1, name="--threads") == (1, "--threads")  # an explicit count wins
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert threads.resolve() == (1, "4 physical cores, 3.0 CPUs kept busy by other processes")
    for bad in ("0", "abc", "-2"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        with pytest.raises(TianyingError, match="OMP_NUM_THREADS"):
            threads.resolve()


def test_bad_counts_are_refused_and_too_many_warned(monkeypatch):
    fake_machine(monkeypatch, {}, {0, 1})
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(TianyingError, match="threads must be a whole number ≥ 1"):
            threads.resolve(bad)
    with pytest.warns(UserWarning, match="more than the 2 CPUs"):
        assert threads.resolve(3) == (3, "threads")


def test_configure_sets_torch_and_the_tokenizers_pool(monkeypatch):
    fake_machine(monkeypatch, {}, {0, 1, 2})
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    with threads.preserved():
        before = torch.get_num_threads()
        assert threads.configure(None) == 3 and torch.get_num_threads() == 3
        assert os.environ["RAYON_NUM_THREADS"] == "3" and threads.describe() == "3 threads (3 physical cores)"
        monkeypatch.setenv("RAYON_NUM_THREADS", "7")  # the user's own setting stays unless --threads is given
        threads.configure(None)
        assert os.environ["RAYON_NUM_THREADS"] == "7"
        threads.configure(1, name="--threads")
        assert torch.get_num_threads() == 1 and os.environ["RAYON_NUM_THREADS"] == "1"
        assert threads.describe() == "1 thread (--threads)"
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------- the CLI
COMPUTING = ["generate", "chat", "serve", "eval", "pretrain", "finetune", "quantize", "convert", "merge-lora",
             "tokenizer train", "tokenizer stats"]
NOT_COMPUTING = {"data index": "tokenizes in --workers processes, one document at a time", "data info": "reads"}


def _leaf_parsers():
    """{'verb' or 'verb action': parser} for every command the CLI has."""
    import argparse

    def subs(p):
        return next((a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)

    out = {}
    for verb, p in subs(build_parser()).items():
        inner = subs(p)
        out.update({f"{verb} {a}": q for a, q in inner.items()} if inner else {verb: p})
    return out


def test_every_verb_that_computes_takes_threads():
    leaves = _leaf_parsers()
    assert set(leaves) == set(COMPUTING) | set(NOT_COMPUTING)  # a new verb must be placed in one of them
    for name, p in leaves.items():
        opts = {o for a in p._actions for o in a.option_strings}
        assert ("--threads" in opts) == (name in COMPUTING), name
        if name in COMPUTING:
            help_ = next(a.help for a in p._actions if "--threads" in a.option_strings)
            assert "physical cores" in help_ and "OMP_NUM_THREADS" in help_


@pytest.mark.parametrize("verb", COMPUTING)
def test_threads_parses_on_each_verb(verb):
    positional = {"generate": [], "chat": [], "serve": [], "eval": [], "pretrain": [], "finetune": [],
                  "quantize": ["a", "b"], "convert": ["a", "b"], "merge-lora": ["a", "b", "c"],
                  "tokenizer train": ["--input", "f", "--vocab-size", "300", "--output", "o"],
                  "tokenizer stats": ["--tokenizer", "t", "--input", "f"]}[verb]
    args = build_parser().parse_args([*verb.split(), *positional, "--threads", "3"])
    assert args.threads == "3" and args.threads_torch == (not verb.startswith("tokenizer"))


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_threads_is_one_line_before_any_work(value, capsys):
    # the checkpoint does not exist: the --threads error comes first, as one line, no usage text
    assert main(["generate", "no/such/ckpt", "--prompt", "x", f"--threads={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tianying generate: error: --threads must be a whole number ≥ 1")


def test_threads_apply_during_the_verb_and_are_put_back(monkeypatch, capsys):
    import tianying.cli.quantize as verb

    seen = {}
    monkeypatch.setattr(verb, "run", lambda args: seen.setdefault("n", torch.get_num_threads()) and 0)
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    assert main(["quantize", "a", "b", "--threads", str(other)]) == 0
    assert seen["n"] == other and torch.get_num_threads() == before


def test_real_eval_run_reports_its_threads(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "r.json"
    assert main(["eval", str(DEMO), "--sample-data", "--tasks", "ceval", "--limit", "1", "--no-progress",
                 "--output", str(out)]) == 0
    assert "1 thread (OMP_NUM_THREADS)" in capsys.readouterr().out.splitlines()
    assert json.loads(out.read_text())["threads"] == 1
    assert main(["eval", str(DEMO), "--sample-data", "--tasks", "ceval", "--limit", "1", "--no-progress",
                 "--threads", "2", "--output", str(out)]) == 0
    assert "2 threads (--threads)" in capsys.readouterr().out.splitlines()
    assert json.loads(out.read_text())["threads"] == 2


def test_real_generate_with_threads_equals_the_api(capsys):
    from tianying.api import LLM

    expected = LLM.load(DEMO).generate("北京是", max_new_tokens=6)
    assert main(["generate", str(DEMO), "--prompt", "北京是", "--max-new-tokens", "6", "--threads", "1"]) == 0
    assert capsys.readouterr().out == expected


def test_api_load_takes_threads():
    from tianying.api import LLM

    with threads.preserved():
        LLM.load(DEMO, threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(TianyingError, match="threads must be a whole number ≥ 1, got 0"):
            LLM.load(DEMO, threads=0)


def test_tokenizer_verb_runs_without_importing_torch(tmp_path):
    docs = tmp_path / "d.jsonl"
    docs.write_text("\n".join(json.dumps({"text": t, "lang": "en"}) for t in ["hello world", "a b c"]) + "\n")
    code = ("import sys; from tianying.cli import main; "
            f"rc = main(['tokenizer', 'stats', '--tokenizer', {str(ROOT / 'tests/data/tokenizer')!r}, "
            f"'--input', {str(docs)!r}, '--no-progress', '--threads', '1']); "
            "print('torch' in sys.modules, rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.strip().splitlines()[-1] == "False 0", r.stderr
