"""Training checkpoints that never lose work, and the state needed to resume a run bit-exactly.

`out_dir/checkpoints/step-NNNNNNNN/` is a Hugging Face model directory (loadable by `LLM.load`) plus
`trainer_state.pt` (optimizer, loss scaler, step, data position, config) and `rng-rankR.pt` per process.
Everything is written into a hidden temporary sibling, fsynced, and only then renamed to its final name, so
a `step-*` directory is complete by construction; a process killed mid-save leaves a `.tmp` directory that
the next save or resume deletes, and the previous checkpoint untouched.

State files are `torch.save` of plain dicts of tensors and numbers and are read with `weights_only=True`:
loading a checkpoint never runs pickled code.

Runs: a fresh run refuses an out_dir that is not empty (`check_out_dir`) unless told to `overwrite`; it writes
a new run id to `out_dir/run.json` and into every checkpoint (`step-N/run.json`). Retention (keep_last_k) only
deletes checkpoints of the current run, and `--resume` continues the run named in out_dir/run.json, so the
checkpoints of an earlier run in the same directory are never deleted nor mistaken for this one's.
A save that fails (disk full, I/O error) removes its temporary directory and raises `CheckpointSaveError`
naming the directory, the disk and its free space; the previous checkpoint is untouched.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tianying.checkpoint import CheckpointError, _fsync_dir
from tianying.errors import TianyingError
from tianying.train.distributed import DistInfo, barrier
from tianying.weights import replace_dir

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
_STEP_RE = re.compile(r"^step-(\d{8})$")


class OutDirInUse(TianyingError):
    """A fresh run pointed at an out_dir that already holds something."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint or the final model failed (disk full, I/O error); the previous one is intact."""


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: str | Path, step: int) -> Path:
    return checkpoints_root(out_dir) / f"step-{step:08d}"


def list_checkpoints(out_dir: str | Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path), oldest first; only those of run `run_id` when given."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            if run_id is None or checkpoint_run_id(p) == run_id:
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(out_dir: str | Path, run_id: str | None = None) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(out_dir, run_id)
    return ckpts[-1] if ckpts else None


# ------------------------------------------------------------------------------------------- runs
def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def checkpoint_run_id(path: str | Path) -> str:
    """The run a checkpoint belongs to ("" for checkpoints written before runs were recorded)."""
    return str(_read_json(Path(path) / RUN_FILE).get("run_id", ""))


def current_run_id(out_dir: str | Path) -> str | None:
    """The run out_dir/run.json names; None when there is none (a fresh or an older directory)."""
    rid = _read_json(Path(out_dir) / RUN_FILE).get("run_id")
    return str(rid) if rid is not None else None


def check_out_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """A fresh run (neither `resume` nor `overwrite`) needs a missing or empty out_dir."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise OutDirInUse(f"out_dir {p} is a file, not a directory")
    if resume or overwrite or not p.exists():
        return
    names = sorted(x.name for x in p.iterdir())
    if names:
        shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
        raise OutDirInUse(f"out_dir {p} is not empty ({shown}): pass --resume to continue the run in it, "
                          "--overwrite to start a new run there (the old checkpoints are kept), or another out_dir")


def start_run(out_dir: str | Path, resume: bool) -> tuple[str, tuple[int, Path] | None]:
    """(run id, checkpoint to resume from or None). A resumed run keeps its id, a fresh one gets a new one.

    Resuming picks the newest checkpoint of the run named in out_dir/run.json; a directory written before run
    ids existed resumes its newest checkpoint and adopts that checkpoint's id.
    """
    if resume:
        rid = current_run_id(out_dir)
        ckpt = latest_checkpoint(out_dir, rid)
        if rid is None:
            rid = checkpoint_run_id(ckpt[1]) if ckpt else None
        if rid is not None:
            return rid, ckpt
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3), None


def write_run_file(out_dir: str | Path, run_id: str) -> None:
    p = Path(out_dir)
    p.mkdir(parents=True, exist_ok=True)
    tmp = p / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id}) + "\n", encoding="utf-8")
    os.replace(tmp, p / RUN_FILE)


# ------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict:
    np_state = np.random.get_state()
    out = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------- save
def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def clean_partial(out_dir: str | Path) -> None:
    """Remove temporary directories left by a save that was killed."""
    root = checkpoints_root(out_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out_dir: str | Path, step: int, info: DistInfo, *,
                    write_model: Callable[[Path], None] | None, trainer_state: dict | None,
                    keep_last_k: int | None = None, run_id: str = "") -> Path:
    """Write step-NNNNNNNN atomically. Collective: every rank calls it (each writes its own RNG file).

    Args:
        write_model: rank 0's writer of the model files into a directory that does not exist yet
            (e.g. `checkpoint.save_hf`); None on other ranks.
        trainer_state: rank 0's optimizer/scheduler/data state; None on other ranks.
        keep_last_k: delete all but the newest K complete checkpoints *of run `run_id`* after this one lands.
        run_id: recorded in step-N/run.json.
    Raises CheckpointSaveError (one line: the directory, the reason, the disk's free space) when writing fails;
    the temporary directory is removed and every earlier checkpoint is left as it was.
    """
    root = checkpoints_root(out_dir)
    final = step_dir(out_dir, step)
    tmp = root / f".step-{step:08d}.tmp"
    try:
        if info.is_main:
            root.mkdir(parents=True, exist_ok=True)
            clean_partial(out_dir)
            if write_model is not None:
                write_model(tmp)
            tmp.mkdir(parents=True, exist_ok=True)
        barrier(info)
        torch.save(capture_rng(), tmp / f"rng-rank{info.rank}.pt")
        barrier(info)
        if info.is_main:
            torch.save({**(trainer_state or {}), "step": step, "world_size": info.world_size, "run_id": run_id},
                       tmp / STATE_FILE)
            (tmp / RUN_FILE).write_text(json.dumps({"run_id": run_id, "step": step}) + "\n", encoding="utf-8")
            _fsync_tree(tmp)
            replace_dir(tmp, final)  # the old copy of a re-run step stays until the new one is in place
            _fsync_dir(root)
    except (OSError, RuntimeError) as e:
        failure = save_failure(root, f"checkpoint step {step}", e)
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    else:
        failure = None
    if failure is not None:  # raised out here, so the writer's frames (and its open file) are gone
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(out_dir)
        keep = f"the last good checkpoint, {last[1]}, is intact" if last else "no earlier checkpoint exists"
        raise CheckpointSaveError(f"{failure}; {keep}")
    if info.is_main and keep_last_k:
        for _, old in list_checkpoints(out_dir, run_id)[:-keep_last_k]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def save_final(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Write the final model through a temporary sibling, so a failed save leaves the old `final` whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    failure = None
    try:
        write(tmp)
        _fsync_tree(tmp)
        replace_dir(tmp, final)
    except (OSError, RuntimeError) as e:
        failure = save_failure(final.parent, "the final model", e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None:
        raise CheckpointSaveError(failure)
    return final


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    dev = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def save_failure(where: Path, what: str, e: BaseException) -> str:
    """One line: what could not be written where, why, and how full the disk holding it is."""
    where = Path(where)
    try:
        mnt = _mount_point(where)
        du = shutil.disk_usage(mnt)
        disk = f"the disk at {mnt} has {du.free / 2**20:.1f} MiB free of {du.total / 2**20:.1f} MiB"
        nearly_full = du.free < max(16 << 20, du.total // 100)
    except OSError:
        disk, nearly_full = "its disk could not be examined", False
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        reason = "no space left on the disk"
    elif isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    elif nearly_full:  # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
        reason = "the write failed, apparently because the disk is full"
    else:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"could not save {what} in {where}: {reason} ({disk})"


# ------------------------------------------------------------------------------------------- load
def load_trainer_state(path: str | Path, info: DistInfo) -> tuple[dict, dict | None]:
    """(trainer_state, this rank's RNG state or None) from a checkpoint directory, with clear errors."""
    path = Path(path)
    state = _load(path / STATE_FILE)
    for key in ("step", "optimizer"):
        if key not in state:
            raise CheckpointError(f"{path / STATE_FILE}: missing {key!r}; not a tianying training checkpoint")
    rng_file = path / f"rng-rank{info.rank}.pt"
    rng = _load(rng_file) if rng_file.is_file() else None
    return state, rng


def _load(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file} not found; the checkpoint is incomplete")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, unsupported global: all mean a corrupt file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: corrupt or unreadable training state ({msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a dict of training state, found {type(obj).__name__}")
    return obj
