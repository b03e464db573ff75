"""The files of a run: paths through ``etils.epath`` and one writer.

Paths: every workdir, checkpoint, teacher and dataset path is an ``epath.Path``, so a
``gs://bucket/run`` workdir is an object-store prefix (orbax and TFDS take the same
paths) instead of a local folder named ``gs:``. ``as_path`` makes a local path
absolute and leaves URIs (``gs://``, ``s3://``...) as they are.

One writer: with several JAX processes (pod slices, several GPU hosts) only process 0
writes JSON, JSONL, Markdown summaries, plots and TensorBoard events; orbax
coordinates checkpoint writes across processes itself. Every function here that
writes is a no-op on the other processes, so callers need no check of their own.

Atomic writes: a local file is written to a uniquely named temporary file in the same
directory and renamed over the target, so a crash or a concurrent writer never
leaves half a file. An object store publishes an object only once its upload has
completed, so a remote file is written in one upload.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any

import jax
from etils import epath


def is_writer() -> bool:
    """True on the process that writes the run's reports: JAX process 0."""
    return jax.process_index() == 0


def as_path(path: epath.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a local path absolute with ``~`` expanded, a URI
    such as ``gs://bucket/dir`` unchanged."""
    if is_local(path):
        return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    return epath.Path(path)


def is_local(path: epath.PathLike) -> bool:
    """Whether ``path`` names the local file system (not ``scheme://...``)."""
    return "://" not in os.fspath(path)


def write_atomic(path: epath.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically (see the module docstring),
    whichever process calls it."""
    path = epath.Path(path)
    if not is_local(path):
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return
    fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
        os.replace(tmp, os.fspath(path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: epath.PathLike, text: str) -> None:
    """Write a text file atomically, on process 0 only."""
    if is_writer():
        write_atomic(path, text)


def save_json(path: epath.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically, on process 0 only."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def save_figure(fig, path: epath.PathLike, dpi: int = 100) -> None:
    """Save a matplotlib figure as PNG atomically, on process 0 only."""
    if is_writer():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        write_atomic(path, buffer.getvalue())


def make_dirs(path: epath.PathLike) -> epath.Path:
    """Create directory ``path`` with its parents (process 0 only); returns it."""
    path = epath.Path(path)
    if is_writer():
        path.mkdir(parents=True, exist_ok=True)
    return path


class JsonlLog:
    """A JSON-lines file that grows by whole lines, written by process 0 only.

    Locally every ``append`` is flushed to the end of the file, so a killed run keeps
    what it logged. Object stores cannot append: there the lines are kept in memory
    (after those already stored) and the whole object is rewritten by each ``append``.
    """

    def __init__(self, path: epath.PathLike):
        self.path = epath.Path(path)
        self._file = None
        self._lines: list[str] | None = None
        if not is_writer():
            return
        if is_local(self.path):
            self._file = self.path.open("a")
        else:
            self._lines = self.path.read_text().splitlines(True) if self.path.exists() else []

    def append(self, records: list[dict]) -> None:
        """Add one line per record (no-op on processes other than 0)."""
        text = "".join(json.dumps(record) + "\n" for record in records)
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
        elif self._lines is not None:
            self._lines.append(text)
            write_atomic(self.path, "".join(self._lines))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
