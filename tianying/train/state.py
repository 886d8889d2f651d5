"""Training checkpoints that never lose work, and the state needed to resume a run bit-exactly.

`out_dir/checkpoints/step-NNNNNNNN/` is a Hugging Face model directory (loadable by `LLM.load`) plus
`trainer_state.pt` (optimizer, loss scaler, step, data position, config) and `rng-rankR.pt` per process.
Everything is written into a hidden temporary sibling, fsynced, and only then renamed to its final name, so
a `step-*` directory is complete by construction; a process killed mid-save leaves a `.tmp` directory that
the next save or resume deletes, and the previous checkpoint untouched.

State files are `torch.save` of plain dicts of tensors and numbers and are read with `weights_only=True`:
loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tianying.checkpoint import CheckpointError, _fsync_dir
from tianying.train.distributed import DistInfo, barrier
from tianying.weights import replace_dir

STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: str | Path, step: int) -> Path:
    return checkpoints_root(out_dir) / f"step-{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (step, path), oldest first."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(out_dir: str | Path) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


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
                    keep_last_k: int | None = None) -> Path:
    """Write step-NNNNNNNN atomically. Collective: every rank calls it (each writes its own RNG file).

    Args:
        write_model: rank 0's writer of the model files into a directory that does not exist yet
            (e.g. `checkpoint.save_hf`); None on other ranks.
        trainer_state: rank 0's optimizer/scheduler/data state; None on other ranks.
        keep_last_k: delete all but the newest K complete checkpoints after this one lands.
    """
    root = checkpoints_root(out_dir)
    final = step_dir(out_dir, step)
    tmp = root / f".step-{step:08d}.tmp"
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
        torch.save({**(trainer_state or {}), "step": step, "world_size": info.world_size}, tmp / STATE_FILE)
        _fsync_tree(tmp)
        replace_dir(tmp, final)  # a re-run over the same step: the old copy stays until the new one is in place
        if keep_last_k:
            for _, old in list_checkpoints(out_dir)[:-keep_last_k]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


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
