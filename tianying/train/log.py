"""Training metrics: out_dir/metrics.csv (always), TensorBoard (when installed), a loss-curve PNG (matplotlib).

The CSV is the source of truth: it is plain, append-only, and on resume rows after the resumed step are
dropped so a crashed-and-resumed run reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

COLUMNS = ["step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "tokens", "elapsed_s", "loss_scale",
           "val_loss", "val_ppl",
           # preference training (tianying.train.preference): means over the logged steps' pairs
           "reward_margin", "reward_acc", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp"]


class MetricsLogger:
    """Rows of COLUMNS to metrics.csv (+ TensorBoard scalars); a no-op on ranks other than 0."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.csv"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep: list[dict] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                keep = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        self._f = open(self.path, "w", newline="")  # noqa: SIM115 — closed in close()
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        self._w.writeheader()
        for r in keep:
            self._w.writerow({k: r.get(k, "") for k in COLUMNS})
        self._f.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
            except ImportError:
                pass  # tensorboard is optional; the CSV has everything

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self._w.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
        self._f.flush()
        if self._tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}" if not k.startswith("val_") else f"valid/{k[4:]}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.csv rows with numbers parsed (empty cells → None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in rows]


def plot_loss(csv_path: str | Path, png_path: str | Path, ylabel: str = "loss (nats/token)") -> Path | None:
    """Training (and validation) loss against step; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; no loss-curve PNG (pip install matplotlib)", stacklevel=2)
        return None
    rows = read_metrics(csv_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    valid = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
