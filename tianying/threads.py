"""How many CPU threads the model's math uses: one policy for every verb and the Python API.

    threads.configure(None)  # the policy below; returns the number it set
    threads.configure(4)     # exactly 4 (`--threads 4`)

The policy, in order: an explicit count; else $OMP_NUM_THREADS when the user set it; else the physical cores
(SMT siblings share one core's arithmetic units, so a second thread per core only adds barrier waits) among
the CPUs this process may run on (its affinity mask, and the cgroup CPU quota of a container), less the cores
other processes keep busy right now.

Why the last part: OpenMP splits every op into one slice per thread and waits at a barrier for all of them.
A thread whose core is taken by another process runs only when the scheduler gives it a slice, so every op
waits for it, and the threads that are waiting spin. Measured on a shared 2-core machine with busy loops
competing (notes/threads16.md): `tianying eval models/demo --limit 2` took 2.5x longer at 2 threads than at
1 (37 s vs 15 s), while 2 threads gain only 12% when the cores are free. So a core counts as taken when other
processes use at least half of it, sampled from /proc/stat between `start_load_sample()` (the CLI calls it
first) and the choice, a window of the imports' 1-2 s, with this process's own CPU time taken out. Not
`os.getloadavg()`: it lags by a minute, so right after a run of ours on 16 cores it would hand the next run 1
thread, and in a container it counts the host's processes on CPUs we may not use.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings

from tianying.errors import TianyingError

# the decision configure() made last, for the verbs' setup lines: (threads, why)
_CHOICE: tuple[int, str] | None = None
_LOAD_START: tuple[float, dict[int, tuple[int, int]], int] | None = None  # (time, per-CPU ticks, own ticks)
MIN_WINDOW = 0.05  # seconds of /proc/stat sampling at least (clock ticks are 10 ms: 5 per CPU)


def _read(path: str) -> str | None:
    """One small /sys or /proc file, or None where it does not exist (macOS, some containers)."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' (the kernel's cpulist format) → {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if lo:
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def physical_cores(cpus: set[int]) -> int:
    """Cores among `cpus`, two SMT siblings counting once; len(cpus) where the topology is not readable."""
    cores = set()
    for c in cpus:
        siblings = _read(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list")
        if siblings is None:
            return len(cpus)
        cores.add(min(_cpu_list(siblings)))  # a core is named by its first logical CPU
    return max(1, len(cores))


def cpu_quota() -> float | None:
    """CPUs' worth of time a cgroup lets this process use per period (cgroup v2 cpu.max, else v1), or None."""
    cgroup = _read("/proc/self/cgroup") or ""
    path = next((line[3:] for line in cgroup.splitlines() if line.startswith("0::")), "/")
    quotas = []
    while True:  # a limit on any parent cgroup applies too
        quota, _, period = (_read(f"/sys/fs/cgroup{path.rstrip('/')}/cpu.max") or "max").partition(" ")
        if quota != "max" and period:
            quotas.append(int(quota) / int(period))
        if path in ("", "/"):
            break
        path = path.rsplit("/", 1)[0] or "/"
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _cpu_ticks(cpus: set[int]) -> tuple[dict[int, tuple[int, int]], int] | None:
    """({cpu: (busy ticks, all ticks)} for `cpus`, this process's own ticks) from /proc, or None."""
    stat, own = _read("/proc/stat"), _read("/proc/self/stat")
    if stat is None or own is None:
        return None
    ticks = {}
    for line in stat.splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            ticks[int(name[3:])] = (sum(v) - v[3] - v[4], sum(v))
    utime, stime = own.rsplit(")", 1)[1].split()[11:13]  # fields 14 and 15; the name may hold spaces
    return ticks, int(utime) + int(stime)


def start_load_sample() -> None:
    """Start the window over which `default_threads` measures what other processes use (the CLI calls it first,
    so the window spans the imports instead of adding a wait)."""
    global _LOAD_START
    now = _cpu_ticks(_affinity())
    _LOAD_START = None if now is None else (time.monotonic(), *now)


def busy_cpus(before: tuple[dict[int, tuple[int, int]], int], after: tuple[dict[int, tuple[int, int]], int]) -> float:
    """CPUs' worth of time other processes used between two `_cpu_ticks` samples of the same CPUs."""
    (t0, own0), (t1, own1) = before, after
    cpus = [c for c in t1 if c in t0]
    busy = sum(t1[c][0] - t0[c][0] for c in cpus) - (own1 - own0)
    elapsed = sum(t1[c][1] - t0[c][1] for c in cpus) / max(len(cpus), 1)  # ticks per CPU in the window
    return min(max(busy / elapsed, 0.0), len(cpus)) if elapsed > 0 else 0.0


def _others_busy(cpus: set[int]) -> float | None:
    global _LOAD_START
    start, _LOAD_START = _LOAD_START, None
    if start is None:
        before = _cpu_ticks(cpus)
        if before is None:
            return None
        time.sleep(MIN_WINDOW)
    else:
        before = start[1:]
        time.sleep(max(0.0, MIN_WINDOW - (time.monotonic() - start[0])))
    after = _cpu_ticks(cpus)
    return None if after is None else busy_cpus(before, after)


def default_threads() -> tuple[int, str]:
    """The policy's thread count without $OMP_NUM_THREADS or an explicit count, and why, in a few words."""
    cpus = _affinity()
    cores = physical_cores(cpus)
    why = f"{cores} physical core{'s' * (cores != 1)}"
    n = cores
    quota = cpu_quota()
    if quota is not None and math.floor(quota) < n:  # more threads than the quota: the cgroup stalls them all
        n = max(1, math.floor(quota))
        why += f", CPU quota {quota:g}"
    local = os.environ.get("LOCAL_WORLD_SIZE") or (os.environ.get("WORLD_SIZE") if "LOCAL_RANK" in os.environ else "")
    if local.isdigit() and int(local) > 1:  # ranks of one machine share its cores (torchrun sets OMP_NUM_THREADS)
        n = max(1, n // int(local))
        why += f" shared by {local} local ranks"
    busy = _others_busy(cpus)
    if busy is not None:
        taken = math.floor(busy * cores / len(cpus) + 0.5)  # in cores; a core counts when ≥ half busy
        if taken and cores - taken < n:
            n = max(1, cores - taken)
            why += f", {busy:.1f} CPUs kept busy by other processes"
    return n, why


def _env_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    first = value.split(",")[0].strip()  # OpenMP allows a list, one count per nesting level
    if not first.isdigit() or int(first) < 1:
        raise TianyingError(f"OMP_NUM_THREADS={value!r} is not a thread count ≥ 1")
    return int(first)


def resolve(n: int | None = None, *, name: str = "threads") -> tuple[int, str]:
    """(threads, why) under the policy: `n` when given (`name` is what the user wrote, for the error),
    else $OMP_NUM_THREADS, else `default_threads()`."""
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TianyingError(f"{name} must be a whole number ≥ 1, got {n!r}")
        cpus = len(_affinity())
        if n > cpus:
            warnings.warn(f"{name} {n} is more than the {cpus} CPUs this process may use; threads waiting for "
                          "a core slow every operation down", stacklevel=2)
        return n, name
    env = _env_threads()
    if env is not None:
        return env, "OMP_NUM_THREADS"
    return default_threads()


def configure(n: int | None = None, *, name: str = "threads", torch: bool = True) -> int:
    """Choose the thread count (`resolve`) and apply it: torch's intra-op pool (and the inter-op pool where
    it has not started yet), and the `tokenizers` pool unless $RAYON_NUM_THREADS says otherwise. With
    torch=False torch is neither imported nor changed (the tokenizer verbs). Returns the count."""
    global _CHOICE
    _env_threads()  # a bad $OMP_NUM_THREADS fails before libgomp (loaded with torch) prints its own complaint
    if torch:
        import torch as _torch  # before the choice: importing it is most of the load-sampling window
    threads, why = resolve(n, name=name)
    if torch and _torch.get_num_threads() != threads:  # (a forked process should not touch its OpenMP pool needlessly)
        _torch.set_num_threads(threads)
        try:
            _torch.set_num_interop_threads(threads)
        except RuntimeError:  # only before the first inter-op work, once per process
            pass
    if n is not None or not os.environ.get("RAYON_NUM_THREADS"):
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when `tokenizers` first runs in parallel
    _CHOICE = (threads, why)
    return threads


def describe() -> str:
    """The last `configure` decision as text for a setup line, e.g. '2 threads (2 physical cores)'."""
    if _CHOICE is None:
        n = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
        return f"{n} threads (torch's default)" if n else "threads not configured"
    n, why = _CHOICE
    return f"{n} thread{'s' * (n != 1)} ({why})"


@contextlib.contextmanager
def preserved():
    """Put torch's thread count, $RAYON_NUM_THREADS and the last decision back afterwards: `tianying.cli.main`
    called from Python leaves no trace."""
    global _CHOICE
    torch = sys.modules.get("torch")
    before = (torch.get_num_threads() if torch else None, os.environ.get("RAYON_NUM_THREADS"), _CHOICE)
    try:
        yield
    finally:
        if before[0] is not None:
            torch.set_num_threads(before[0])
        if before[1] is None:
            os.environ.pop("RAYON_NUM_THREADS", None)
        else:
            os.environ["RAYON_NUM_THREADS"] = before[1]
        _CHOICE = before[2]
