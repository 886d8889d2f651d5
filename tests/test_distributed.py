"""torchrun on CPU (gloo): 2 processes × half the batch train like 1 process × the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tianying.train.log import read_metrics

DATA = Path(__file__).parent / "data"
TOK = DATA / "tokenizer"
STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tianying.data.indexed import build_indexed_dataset

    prefix = tmp_path_factory.mktemp("dist") / "tiny"
    build_indexed_dataset([DATA / "tiny.jsonl"], TOK, prefix, progress=False)
    return str(prefix)


def overrides(corpus: str, out: Path, batch_size: int) -> list[str]:
    kw = dict(model="test-gqa", tokenizer=TOK, data=corpus, seq_length=32, batch_size=batch_size, max_steps=STEPS,
              lr=1e-2, warm_up=0.25, log_interval=1, eval_interval=STEPS, eval_iters=2, save_interval=100,
              out_dir=out, progress="false", tensorboard="false", plot="false", seed=5, peak_flops=1e12)
    return [f"{k}={v}" for k, v in kw.items()] + ["model_args={vocab_size: 3008, n_layer: 2}"]


def losses(out: Path) -> tuple[list[float], list[float]]:
    rows = read_metrics(out / "metrics.csv")
    return [r["loss"] for r in rows if r["loss"] is not None], [r["val_loss"] for r in rows if r["val_loss"]]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    from tianying.cli import main

    out = tmp_path_factory.mktemp("single")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["pretrain", *overrides(corpus, out, 4)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _worker(rank: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from tianying.cli import main

    os._exit(main(argv))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_two_processes_match_one(corpus, single, tmp_path, strategy):
    out = tmp_path / strategy
    argv = ["pretrain", *overrides(corpus, out, 2), f"distributed={'fsdp' if strategy == 'fsdp' else 'ddp'}"]
    if strategy == "torchrun":  # the real launcher through the CLI (slow: each rank imports torch afresh)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tianying", *argv]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TIANYING_DEBUG": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:  # forked ranks skip re-importing torch: the same code path in a fraction of the time
        import multiprocessing as mp

        port = _free_port()
        procs = [mp.get_context("fork").Process(target=_worker, args=(r, port, argv)) for r in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(240)
        assert [p.exitcode for p in procs] == [0, 0]
    (l1, v1), (l2, v2) = losses(single), losses(out)
    assert len(l1) == len(l2) == STEPS
    np.testing.assert_allclose(l2, l1, rtol=2e-5)
    np.testing.assert_allclose(v2, v1, rtol=2e-5)
    assert l1[-1] < l1[0]  # it did train, so equality is not trivial
    from safetensors.torch import load_file

    w1, w2 = load_file(str(single / "final/model.safetensors")), load_file(str(out / "final/model.safetensors"))
    diff = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1])
    # Adam divides by √v: a near-zero gradient whose last bits differ can move one weight by up to ~lr
    assert diff.max() < 1e-3 and diff.mean() < 1e-6
    assert (out / "checkpoints" / f"step-{STEPS:08d}" / "rng-rank1.pt").is_file()
