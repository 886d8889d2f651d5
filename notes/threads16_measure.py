"""Measure tianying's CPU thread choice: wall time of a small eval / generate run on the bundled models/demo at
several thread settings, on an idle machine and with a competing busy loop per core. Interleaved and repeated in
one run, since the machine is shared. Usage:

    python notes/threads16_measure.py --reps 2 --loads 0,1,2 --configs 1,2,2p
Config names: N = OMP_NUM_THREADS=N; Np = the same with OMP_WAIT_POLICY=PASSIVE; default = nothing set (the
policy of tianying.threads); tN = `--threads N`. Prints a table of median seconds, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = {
    "eval": ["eval", "models/demo", "--sample-data", "--limit", "2", "--no-progress", "--max-new-tokens", "8"],
    "generate": ["generate", "models/demo", "--prompt", "北京是中国的首都，", "--max-new-tokens", "64"],
}


def env_for(config: str) -> tuple[dict, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                           "TIANYING_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    extra: list[str] = []
    if config.startswith("t"):
        extra = ["--threads", config[1:]]
    elif config != "default":
        env["OMP_NUM_THREADS"] = config.rstrip("p")
        if config.endswith("p"):
            env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env, extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--loads", default="0,2", help="busy-loop processes running during the measurement")
    ap.add_argument("--configs", default="1,2,default")
    ap.add_argument("--work", default="eval,generate")
    a = ap.parse_args()
    loads = [int(x) for x in a.loads.split(",")]
    configs = a.configs.split(",")
    times: dict[str, list[float]] = {}
    choices: dict[str, list[str]] = {}  # what the policy printed (eval)
    for rep in range(a.reps):
        for load in loads:
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
            try:
                time.sleep(0.5 if load else 0)
                for work in a.work.split(","):
                    for config in configs:
                        env, extra = env_for(config)
                        t0 = time.perf_counter()
                        r = subprocess.run([sys.executable, "-m", "tianying", *WORK[work], *extra], cwd=ROOT, env=env,
                                           capture_output=True, text=True)
                        dt = time.perf_counter() - t0
                        if r.returncode:
                            sys.exit(f"{work} {config}: {r.stderr.strip()}")
                        times.setdefault(f"{work}|{load}|{config}", []).append(dt)
                        chose = next((line for line in r.stdout.splitlines() if " thread" in line), "")
                        if chose:
                            choices.setdefault(f"{work}|{load}|{config}", []).append(chose)
                        print(f"rep {rep} load {load} {work:8s} {config:8s} {dt:6.2f} s  (loadavg "
                              f"{os.getloadavg()[0]:.2f}) {chose}", file=sys.stderr, flush=True)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    print(f"{'work':9s}{'busy loops':>11s}" + "".join(f"{c:>10s}" for c in configs))
    for work in a.work.split(","):
        for load in loads:
            print(f"{work:9s}{load:>11d}" + "".join(f"{statistics.median(times[f'{work}|{load}|{c}']):10.2f}"
                                                     for c in configs))
    print(json.dumps({"bench": "threads", "cpus": os.cpu_count(), "reps": a.reps,
                      "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()}, "choices": choices},
                     ensure_ascii=False))


if __name__ == "__main__":
    main()
