"""The training loop: config, schedule, learning, bit-exact resume, crash safety, checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tianying.checkpoint import CheckpointError
from tianying.config import ConfigError
from tianying.recipes.pretrain import PretrainConfig, run_pretrain
from tianying.train import state as S
from tianying.train.log import read_metrics
from tianying.train.loop import LossScaler, StepBatches, TrainConfig, load_config, lr_at, train

DATA = Path(__file__).parent / "data"
TOK = DATA / "tokenizer"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    from tianying.data.indexed import build_indexed_dataset

    d = tmp_path_factory.mktemp("corpus")
    lines = (DATA / "tiny.jsonl").read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)  # the file is sorted by language; the held-out tail must be a mix
    (d / "mixed.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = d / "tiny"
    build_indexed_dataset([d / "mixed.jsonl"], TOK, prefix, progress=False)
    return str(prefix)


def cfg_for(corpus: str, out: Path, **kw) -> PretrainConfig:
    base = dict(model="test-mha", model_args={"vocab_size": 3008, "n_layer": 1}, tokenizer=str(TOK), data=corpus,
                seq_length=32, batch_size=4, max_steps=8, lr=1e-2, warm_up=0.25, log_interval=1, eval_interval=4,
                eval_iters=2, save_interval=4, out_dir=str(out), progress=False, tensorboard=False, seed=3,
                split="90,10", peak_flops=1e12, plot=False)
    base.update(kw)
    return PretrainConfig(**base)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ config
def test_unknown_key_lists_valid_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-4\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) 'learning_rate'.*valid keys:.*batch_size"):
        load_config(PretrainConfig, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(PretrainConfig, None, ["btach_size=3"])


def test_yaml_and_overrides_are_typed(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 3e-4\nbetas: [0.9, 0.95]\nbatch_size: 2\ndata: '0.5 a 0.5 b'\n")
    cfg = load_config(PretrainConfig, tmp_path / "c.yaml", ["lr=1e-3", "max_steps=7", "activation_checkpointing=true"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float) and cfg.max_steps == 7 and cfg.activation_checkpointing
    assert cfg.betas == (0.9, 0.95) and cfg.batch_size == 2 and cfg.data == "0.5 a 0.5 b"
    with pytest.raises(ConfigError, match="precision"):
        load_config(PretrainConfig, None, ["precision=fp8"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(PretrainConfig, None, ["batch_size=lots"])


def test_shipped_yaml_configs_load():
    for p in (Path(__file__).parents[1] / "configs").glob("pretrain*.yaml"):
        assert isinstance(load_config(PretrainConfig, p), PretrainConfig)


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1) and lrs[-1] > 0.1


def test_loss_scaler():
    s = LossScaler(1024, window=2)
    s.update(False)
    assert s.scale == 512
    s.update(True)
    s.update(True)
    assert s.scale == 1024


def test_step_batches_partition_the_global_batch():
    data = [np.arange(i, i + 5) for i in range(40)]
    one = StepBatches(data, batch_size=4, grad_accum=2, shuffle=True, seed=1)
    parts = [StepBatches(data, batch_size=2, grad_accum=2, rank=r, world_size=2, shuffle=True, seed=1) for r in (0, 1)]
    for step in (0, 3, 7):  # step 7 is in the second epoch (5 steps per epoch)
        a = torch.cat([one.get(step, m)[0] for m in range(2)])
        b = torch.cat([p.get(step, m)[0] for m in range(2) for p in parts])
        assert sorted(a[:, 0].tolist()) == sorted(b[:, 0].tolist())
    assert one.get(0, 0)[0][:, 0].tolist() != one.get(5, 0)[0][:, 0].tolist()  # reshuffled per epoch


# ------------------------------------------------------------------------------------------------ learning
def test_loss_decreases_and_outputs(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path / "run", max_steps=24, eval_interval=12, save_interval=100, keep_last_k=1,
                  plot=True)
    res = run_pretrain(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5
    val = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert len(val) == 2 and val[1] < val[0] and res.val_loss == pytest.approx(val[1], rel=1e-5)
    assert all(r["tokens_per_sec"] > 0 and r["grad_norm"] > 0 and 0 < r["mfu"] for r in rows if r["loss"])
    final = tmp_path / "run" / "final"
    from tianying.checkpoint import load_model

    model, mcfg = load_model(final)
    assert mcfg.vocab_size == 3008 and mcfg.bos_token_id == 3006 and (final / "tokenizer.json").is_file()
    assert [p.name for _, p in S.list_checkpoints(tmp_path / "run")] == ["step-00000024"]
    try:
        import matplotlib  # noqa: F401

        assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    except ImportError:
        pass


def test_resume_is_bit_exact(corpus, tmp_path):
    """8 steps straight == 4 steps, checkpoint, new process state, resume, 4 steps."""
    full = run_pretrain(cfg_for(corpus, tmp_path / "a"))
    cfg_b = cfg_for(corpus, tmp_path / "b")
    run_pretrain(cfg_b)
    # throw away everything after step 4, as if the run had died there
    import shutil

    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000008")
    shutil.rmtree(tmp_path / "b" / "final")
    torch.manual_seed(999)  # the resumed run must not depend on the process's RNG
    res = run_pretrain(cfg_b, resume=True)
    assert full.step == res.step == 8
    wa, wb = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.csv") if r["loss"] is not None]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.csv") if r["loss"] is not None]
    assert la == lb and len(la) == 8
    sa = torch.load(tmp_path / "a/checkpoints/step-00000008/trainer_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b/checkpoints/step-00000008/trainer_state.pt", weights_only=True)
    ea, eb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(ea[k]["exp_avg_sq"], eb[k]["exp_avg_sq"]) for k in ea)


def test_sigkill_mid_save_keeps_previous_checkpoint(corpus, tmp_path):
    """A process killed while writing step 4 leaves step 2 whole; resuming from it matches a clean run."""
    out = tmp_path / "k"
    script = textwrap.dedent(f"""
        import os, signal
        import tianying.train.state as S
        from tianying.recipes.pretrain import PretrainConfig, run_pretrain
        real = S._fsync_tree
        def die(path):
            if "step-00000004" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)  # mid-save: model and state written, not yet renamed
            real(path)
        S._fsync_tree = die
        cfg = PretrainConfig(**{dict(cfg_for(corpus, out, save_interval=2).__dict__)!r})
        run_pretrain(cfg)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in S.list_checkpoints(out)] == [2]
    assert any(p.name.startswith(".step-00000004") for p in (out / "checkpoints").iterdir())
    from tianying.checkpoint import load_model

    load_model(out / "checkpoints" / "step-00000002")  # the survivor loads
    run_pretrain(cfg_for(corpus, out, save_interval=2), resume=True)
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    run_pretrain(cfg_for(corpus, tmp_path / "clean", save_interval=2))
    wa, wb = weights(out / "final"), weights(tmp_path / "clean" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_corrupt_checkpoint_is_a_clear_error(corpus, tmp_path):
    cfg = cfg_for(corpus, tmp_path / "c", max_steps=4, save_interval=2, eval_interval=100)
    run_pretrain(cfg)
    state = tmp_path / "c" / "checkpoints" / "step-00000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        run_pretrain(cfg, resume=True)
    from tianying.cli import main

    ov = [f"{k}={v}" for k, v in dict(model="test-mha", tokenizer=TOK, data=corpus, seq_length=32, max_steps=4,
                                       out_dir=tmp_path / "c", progress="false").items()]
    assert main(["pretrain", "--resume", *ov, "model_args={vocab_size: 3008, n_layer: 1}"]) == 2


def test_frozen_parameters_and_masked_labels(tmp_path):
    """The finetuning path: a trainable subset and -100 labels; frozen weights stay bit-identical."""
    from tianying.config import Config
    from tianying.model import build_model

    model = build_model(Config.from_name("test-mha").replace(n_layer=1), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)

    def example(i):
        ids = torch.from_numpy(rng.integers(3, 500, size=16))
        labels = ids.roll(-1).clone()
        labels[:8] = -100  # prompt tokens are not learned
        labels[-1] = -100
        return ids, labels

    data = [example(i) for i in range(16)]
    stack = lambda xs: (torch.stack([x for x, _ in xs]), torch.stack([y for _, y in xs]))
    batches = StepBatches(data, 4, collate=stack)
    trainable = {n for n, _ in model.named_parameters() if "mlp" in n}
    cfg = TrainConfig(max_steps=3, lr=1e-2, out_dir=str(tmp_path / "ft"), progress=False, tensorboard=False,
                      save_interval=100, peak_flops=1e12, plot=False)
    train(model, batches, cfg, trainable=trainable)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == trainable
    assert (tmp_path / "ft" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(corpus, tmp_path, precision):
    cfg = cfg_for(corpus, tmp_path / precision, max_steps=3, precision=precision, eval_interval=100,
                  save_interval=100, activation_checkpointing=True, seq_length=16, batch_size=2)
    res = run_pretrain(cfg)
    rows = [r for r in read_metrics(tmp_path / precision / "metrics.csv") if r["loss"] is not None]
    assert res.step == 3 and len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert (rows[0]["loss_scale"] is not None) == (precision == "fp16")


def test_keep_last_k(corpus, tmp_path):
    run_pretrain(cfg_for(corpus, tmp_path / "k", max_steps=6, save_interval=1, keep_last_k=2, eval_interval=100,
                         seq_length=16, batch_size=2))
    assert [s for s, _ in S.list_checkpoints(tmp_path / "k")] == [5, 6]


# ------------------------------------------------------------------------------------------------ never lose work
def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def test_a_fresh_run_into_a_used_out_dir_is_refused_and_nothing_is_touched(corpus, tmp_path, capsys):
    out = tmp_path / "used"
    run_pretrain(cfg_for(corpus, out, max_steps=4, save_interval=2, eval_interval=100))
    before = _snapshot(out)
    with pytest.raises(S.OutDirInUse, match=r"not empty \(checkpoints, final, .*--resume.*--overwrite"):
        run_pretrain(cfg_for(corpus, out, max_steps=6, save_interval=3, eval_interval=100))
    assert _snapshot(out) == before
    from tianying.cli import main

    ov = [f"{k}={v}" for k, v in dict(model="test-mha", tokenizer=TOK, data=corpus, seq_length=32, max_steps=2,
                                       out_dir=out, progress="false", tensorboard="false", plot="false").items()]
    assert main(["pretrain", *ov, "model_args={vocab_size: 3008, n_layer: 1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err and "--overwrite" in err
    assert _snapshot(out) == before
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    run_pretrain(cfg_for(corpus, tmp_path / "empty", max_steps=1, eval_interval=100, save_interval=100))


def test_overwrite_keeps_the_old_run_and_retention_and_resume_follow_the_new_one(corpus, tmp_path):
    """The issue's case: old checkpoints with higher step numbers must not evict the new run's, nor be resumed."""
    out, ref = tmp_path / "o", tmp_path / "ref"
    run_pretrain(cfg_for(corpus, out, max_steps=8, save_interval=4, keep_last_k=3, eval_interval=100))
    old_id = S.current_run_id(out)
    old8 = weights(out / "checkpoints" / "step-00000008")
    new = dict(max_steps=6, save_interval=2, keep_last_k=2, eval_interval=100, lr=5e-3, seed=11)
    run_pretrain(cfg_for(corpus, out, **new), overwrite=True)
    new_id = S.current_run_id(out)
    assert new_id != old_id
    runs = {s: S.checkpoint_run_id(p) for s, p in S.list_checkpoints(out)}
    assert runs == {4: new_id, 6: new_id, 8: old_id}  # 2 went by retention (the new run's); old 8 untouched
    assert all(torch.equal(a, b) for a, b in zip(old8.values(), weights(out / "checkpoints/step-00000008").values()))
    run_pretrain(cfg_for(corpus, ref, **new))
    # crash after step 4 of the new run: resume must continue it, not the old run's step 8
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000006")
    shutil.rmtree(out / "final")
    res = run_pretrain(cfg_for(corpus, out, **new), resume=True)
    assert res.step == 6 and S.current_run_id(out) == new_id
    wa, wb = weights(out / "final"), weights(ref / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert 8 in [s for s, _ in S.list_checkpoints(out)]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")])
def test_a_failing_save_is_one_line_and_the_last_checkpoint_survives(corpus, tmp_path, monkeypatch, capsys, error):
    out = tmp_path / "full"
    real_save = torch.save

    def flaky(obj, f, *a, **k):
        if "step-00000004" in str(f):
            Path(f).write_bytes(b"partial")
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky)
    from tianying.cli import main

    ov = [f"{k}={v}" for k, v in dict(model="test-mha", tokenizer=TOK, data=corpus, seq_length=32, max_steps=6,
                                       save_interval=2, eval_interval=100, out_dir=out, progress="false",
                                       tensorboard="false", plot="false").items()]
    assert main(["pretrain", *ov, "model_args={vocab_size: 3008, n_layer: 1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "could not save checkpoint step 4 in" in err and "MiB free of" in err and "step-00000002" in err
    if isinstance(error, OSError):
        assert "no space left on the disk" in err
    assert "internal error" not in err
    assert [s for s, _ in S.list_checkpoints(out)] == [2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]  # no temp dir left
    from tianying.checkpoint import load_model

    load_model(out / "checkpoints" / "step-00000002")
    S.load_trainer_state(out / "checkpoints" / "step-00000002", __import__("tianying.train.distributed").train
                         .distributed.DistInfo())
    monkeypatch.setattr(torch, "save", real_save)
    res = run_pretrain(cfg_for(corpus, out, max_steps=6, save_interval=2, eval_interval=100), resume=True)
    assert res.step == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_keeps_the_previous_checkpoint(corpus, tmp_path):
    probe = tmp_path / "probe"
    kw = dict(max_steps=4, save_interval=2, keep_last_k=1, eval_interval=100)
    run_pretrain(cfg_for(corpus, probe, **kw))
    size = sum(p.stat().st_size for p in (probe / "checkpoints" / "step-00000004").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for the logs and one checkpoint, not for the second one that must land before the first goes
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096}", "tmpfs",
                              str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(S.CheckpointSaveError, match=r"could not save checkpoint step 4 in .*disk") as e:
            run_pretrain(cfg_for(corpus, disk / "run", **kw))
        assert "\n" not in str(e.value) and "step-00000002, is intact" in str(e.value)
        assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["step-00000002"]
        from tianying.checkpoint import load_model

        load_model(disk / "run" / "checkpoints" / "step-00000002")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_finishes_the_step_saves_and_resumes(corpus, tmp_path, sig):
    out = tmp_path / "sig"
    ov = [f"{k}={v}" for k, v in dict(model="test-mha", tokenizer=TOK, data=corpus, seq_length=32, batch_size=4,
                                       max_steps=100000, save_interval=100000, eval_interval=100000,
                                       log_interval=1, out_dir=out, progress="false", tensorboard="false",
                                       plot="false", seed=3).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "tianying", "pretrain", *ov,
                             "model_args={vocab_size: 3008, n_layer: 1}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) >= 4:
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"{sig.name}: finishing this step" in err and "Traceback" not in err
    ckpts = S.list_checkpoints(out)
    assert len(ckpts) == 1
    step = ckpts[0][0]
    assert step >= 3 and f"stopped by {sig.name} after step {step} of 100000" in err
    assert not (out / "final").exists()
    with pytest.warns(UserWarning, match="planned for 100000 steps"):
        res = run_pretrain(cfg_for(corpus, out, max_steps=step + 2, save_interval=100000, eval_interval=100000),
                           resume=True)
    assert res.step == step + 2 and (out / "final" / "model.safetensors").is_file()


def test_a_second_signal_stops_at_once():
    from tianying.train.loop import _StopOnSignal

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job
    with _StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first only asks the loop to stop after this step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode boundary
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_data_smaller_than_one_batch_is_refused_before_training(corpus, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"fewer than one global batch of 4096 \(batch_size 4096"):
        # (with max_steps the packed samples repeat as epochs until they fill the steps; with epochs they cannot)
        run_pretrain(cfg_for(corpus, tmp_path / "small", batch_size=4096, max_steps=None, epochs=1, progress=True))
    assert not (tmp_path / "small").exists()  # nothing written, no progress bar started
    assert "train:" not in capsys.readouterr().err


def test_a_failing_final_save_keeps_the_old_final(tmp_path):
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"old weights")

    def write(d: Path) -> None:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(S.CheckpointSaveError, match=r"^could not save the final model in .*run: no space left") as e:
        S.save_final(final, write)
    assert "\n" not in str(e.value)
    assert (final / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]  # no temp dir left
    S.save_final(final, lambda d: (d.mkdir(), (d / "model.safetensors").write_bytes(b"new")))
    assert (final / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]


def test_document_ids_and_isolated_pretraining(corpus, tmp_path):
    """EOS ends a document; `isolate_docs` trains through the loop with per-document attention, and a step's
    loss equals the per-document losses computed sample by sample, document by document (step 3's batch holds
    a document boundary)."""
    import torch.nn.functional as F

    from tianying.data.pack import collate_packed_docs, document_ids

    assert document_ids(np.array([[5, 2, 1, 7, 2, 1]]), eos_id=2).tolist() == [[0, 0, 1, 1, 1, 2]]
    cfg = cfg_for(corpus, tmp_path / "iso", isolate_docs=True, max_steps=3, save_interval=100, lr=0.0, min_lr=0.0,
                  warm_up=0.0)
    run_pretrain(cfg)  # lr 0: every step's loss is the starting model's on that step's batch
    got = read_metrics(tmp_path / "iso" / "metrics.csv")[2]["loss"]
    # the same first batch by hand: each document of each sample alone (positions from 0)
    from tianying.data.pack import build_pretrain_datasets
    from tianying.recipes.pretrain import resolve_model
    from tianying.tokenizer import Tokenizer

    train_ds, _ = build_pretrain_datasets(corpus, None, 32, cfg.seed, cfg.split, 3 * 4)
    torch.manual_seed(cfg.seed)
    model, mcfg = resolve_model(cfg.model, cfg.model_args, Tokenizer.from_dir(TOK), cfg.seed, torch.device("cpu"))
    x, y, docs = StepBatches(train_ds, 4, 1, collate=collate_packed_docs(mcfg.eos_token_id)).get(2)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(4):
            for d in docs[b].unique():
                sel = docs[b] == d
                logits = model(x[b][sel][None])
                total += float(F.cross_entropy(logits[0], y[b][sel], reduction="sum"))
                n += int(sel.sum())
    assert docs.max() > 0  # the batch really holds several documents per sample
    assert abs(got - total / n) < 1e-4
