"""Metric writers: JSONL always, TensorBoard when TensorFlow + tensorboard are installed.

``clu.metric_writers`` imports TensorFlow, so it is only touched when available.
Only JAX process 0 writes. Every JSONL log of a stage (``metrics.jsonl``, a
pipeline's ``on_log`` files such as ``controller.jsonl``) is cut back to the
resumed step by ``truncate_logs`` when the stage starts, so the replayed steps of a
killed run never appear twice.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import time

from kdjax.train import checkpoint as ckpt_lib


def tensorboard_available() -> bool:
    """True when clu's summary writer can be used (TensorFlow and tensorboard installed)."""
    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tensorboard"))


class MetricWriter:
    """Appends ``{"step": s, "split": ..., **scalars}`` lines to ``metrics.jsonl``.

    Also mirrors the scalars to TensorBoard under ``stage_dir/tb`` when available.
    Lines are flushed as written, so a killed run keeps everything logged so far.
    """

    def __init__(self, stage_dir: pathlib.Path):
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.path = stage_dir / "metrics.jsonl"
        self._file = self._tb = None
        if not ckpt_lib.is_writer():
            return
        self._file = self.path.open("a")
        if tensorboard_available():
            from clu import metric_writers

            self._tb = metric_writers.create_default_writer(str(stage_dir / "tb"), asynchronous=False)

    def write(self, step: int, split: str, scalars: dict) -> None:
        if self._file is None:
            return
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: float(v) for k, v in scalars.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.write_scalars(step, {f"{split}/{k}": float(v) for k, v in scalars.items()})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: pathlib.Path) -> list[dict]:
    """All records of a metrics.jsonl file, in order."""
    with pathlib.Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_logs(stage_dir, step: int) -> None:
    """Drop the records with ``"step" > step`` from every ``*.jsonl`` in ``stage_dir``
    (and a broken line, such as one a kill left half-written); atomic rewrite, process 0.

    Called when a stage starts at ``step`` (0 when fresh): lines a killed run logged
    after its last checkpoint are replayed, not repeated.
    """
    if not ckpt_lib.is_writer():
        return
    for path in sorted(pathlib.Path(stage_dir).glob("*.jsonl")):
        lines = path.read_text().splitlines()
        kept = [line for line in lines if _logged_by(line, step)]
        if len(kept) != len(lines):
            ckpt_lib.write_atomic(path, "".join(line + "\n" for line in kept))


def _logged_by(line: str, step: int) -> bool:
    """Whether a JSONL line is a record of step ``step`` or earlier (or has no step)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return not isinstance(record, dict) or int(record.get("step", step)) <= step


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m'``; ``75`` -> ``'1m15s'``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(stage: str, step: int, total: int, epoch: float, scalars: dict,
                  images_per_sec: float, eta_seconds: float, throughput: str = "") -> str:
    """One human-readable progress line for the log (``throughput``: e.g. per-device
    images/s and MFU, appended when given)."""
    shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    extra = f" ({throughput})" if throughput else ""
    return (
        f"[{stage}] step {step}/{total} epoch {epoch:.2f} {shown} "
        f"{images_per_sec:.0f} img/s{extra} ETA {format_duration(eta_seconds)}"
    )
