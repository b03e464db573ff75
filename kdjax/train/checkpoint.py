"""Checkpoints of a training stage: state + data-iterator state + metadata, via orbax.

Layout under a stage directory ``workdir/<stage>/``:

    checkpoints/<step>/   the latest two checkpoints (state, data, meta) — resume point
    best/<step>/          the checkpoint with the best validation top-1 so far
    damaged/              unreadable checkpoints moved aside at resume (never deleted)

orbax writes each checkpoint into a temporary directory and renames it only once
every item is committed, so an interrupted save never replaces a good checkpoint.
Temporary directories of killed saves are removed when the stage starts again.

At an evaluation that improves on validation, ``best/<step>`` is written first and
``checkpoints/<step>`` second; the resume checkpoint's ``meta.progress.best_step``
names the best step it belongs to. At resume, ``best/`` is brought back to exactly
that step (a best checkpoint written after the resume point is dropped and redone
by the replayed steps), so ``best/`` never falls behind or runs ahead of the results.
If the newest checkpoint cannot be read, it is moved to ``damaged/`` with a warning
and the previous one is used.

``meta`` holds the model spec ({'name', 'num_classes', 'widths', 'input_shape'}),
the full config and progress counters. It is checked before any array is read, so
a checkpoint of another model fails with a message instead of a tree mismatch, and
a resume with a changed training config is refused (see ``config_changes``).

Test hook: ``KDJAX_TEST_KILL_AT=<point>[@<step>]`` SIGKILLs the process at a named
point (``crash_point``), so tests can reproduce a ``kill -9`` at a chosen moment.
Points: ``after_log`` (loop, metrics written, no checkpoint yet), ``inside_best_save``
and ``inside_last_save`` (every file of that save written, before orbax's commit
rename), ``between_saves`` (best written, resume checkpoint not yet) and
``after_saves`` (both written, older best not yet pruned).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from kdjax.train import files

LAST_DIR = "checkpoints"
BEST_DIR = "best"
DAMAGED_DIR = "damaged"
LOCK_FILE = ".kdjax.lock"
KILL_ENV = "KDJAX_TEST_KILL_AT"
ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"
# Config keys that may differ between a checkpoint and the run resuming it: they
# change logging, evaluation cadence, placement or the step cap, not the training.
RESUME_FREE_KEYS = frozenset({
    "train.log_every_steps", "train.eval_every_steps", "train.eval_batch_size",
    "train.num_devices", "train.distributed", "train.coordinator_address",
    "train.num_processes", "train.process_id", "train.max_steps",
    "train.allow_config_change", "data.num_workers", "data.data_dir",
    "teacher.select",  # which checkpoint is read afterwards; training is unaffected
})

log = logging.getLogger("kdjax")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unwritable, or does not fit the configured model."""


class ConfigChangedError(ValueError):
    """A resume whose training-relevant config differs from the checkpoint's."""


class WorkdirBusyError(RuntimeError):
    """Another live kdjax run holds the workdir's lock."""


# ----------------------------------------------------------------------------
# Test hook (see the module docstring)


def crash_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process if ``$KDJAX_TEST_KILL_AT`` is ``name`` or ``name@step``."""
    target = os.environ.get(KILL_ENV, "")
    want, _, at = target.partition("@")
    if want == name and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def _install_inside_save_hook() -> None:
    """Make ``inside_last_save`` / ``inside_best_save`` fire in orbax's commit, after
    every file of the step was written to its temporary directory, before the rename."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize
    points = {LAST_DIR: "inside_last_save", BEST_DIR: "inside_best_save"}

    async def finalize(self, *args, **kwargs):
        final = self.get_final()
        if final.parent.name in points and final.name.isdigit():
            crash_point(points[final.parent.name], int(final.name))
        return await original(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


if os.environ.get(KILL_ENV, "").startswith("inside_"):
    _install_inside_save_hook()


# ----------------------------------------------------------------------------
# Files


def disk_full(err: BaseException | None) -> bool:
    """True if ``err`` or an exception it was raised from is OSError ENOSPC / EDQUOT."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


class WorkdirLock:
    """One run per workdir: an exclusive ``fcntl.flock`` on ``WORKDIR/.kdjax.lock``.

    The file records the holder (pid, host, start time). The kernel drops the lock
    when its process dies, so the lock of a killed run is taken over (with a warning
    naming it); a live holder makes ``acquire`` raise WorkdirBusyError. flock is
    reliable on local disks; on network or object storage use one workdir per run.
    """

    def __init__(self, workdir):
        self.path = epath.Path(workdir) / LOCK_FILE
        self._fd = None

    def __enter__(self):
        fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {self.path.parent} is in use by another kdjax run ({holder}); "
                f"wait for it to end or choose another --workdir.") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            log.warning("taking over the lock of a run that ended without releasing it (%s)",
                        previous)
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        os.ftruncate(self._fd, 0)  # an empty file = released cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        return False


# ----------------------------------------------------------------------------
# Model spec and config checks


def model_spec(name: str, num_classes: int, input_shape, widths=None) -> dict:
    """The JSON-able description that rebuilds a model: ``get_model(name, num_classes, widths)``."""
    return {
        "name": name,
        "num_classes": int(num_classes),
        "widths": dict(widths or {}),
        "input_shape": [int(d) for d in input_shape],
    }


def check_compatible(saved_spec: dict, expected_spec: dict, where: str) -> None:
    """Raise CheckpointError unless a saved model spec matches the configured one."""
    mismatched = [k for k in expected_spec if saved_spec.get(k) != expected_spec[k]]
    if mismatched:
        details = "; ".join(
            f"{k}: checkpoint has {saved_spec.get(k)!r}, config wants {expected_spec[k]!r}"
            for k in mismatched
        )
        raise CheckpointError(
            f"checkpoint at {where} does not fit this run ({details}). Use a fresh "
            f"--workdir, or point the config at a checkpoint of the same model and dataset."
        )


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, after a JSON round trip (tuples become lists)."""
    flat = {}
    for key, value in json.loads(json.dumps(tree, default=str)).items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: dict) -> dict:
    """{dotted key: (saved value, current value)} for every key outside RESUME_FREE_KEYS
    whose value differs (a key present on one side only counts, with value None)."""
    a, b = _flatten(saved), _flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if k not in RESUME_FREE_KEYS and a.get(k) != b.get(k)}


def check_same_config(saved: dict, current: dict, where) -> None:
    """Refuse (ConfigChangedError) a resume from ``where`` whose training-relevant config
    differs, unless ``train.allow_config_change`` is set (then only warn)."""
    changes = config_changes(saved, current)
    if not changes:
        return
    listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changes.items())
    if current.get("train", {}).get("allow_config_change"):
        log.warning("resuming %s with a changed config (allowed): %s", where, listed)
        return
    raise ConfigChangedError(
        f"the checkpoint at {where} was trained with another config ({listed}). Rerun with "
        f"the original values, use a fresh --workdir, or pass "
        f"--config.train.allow_config_change=True to resume with the new values.")


# ----------------------------------------------------------------------------
# Stage checkpoints


def _manager(directory, max_to_keep: int | None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory, options=options)


def remove_unfinished_saves(directory) -> list[str]:
    """Delete the temporary directories (``<step>.orbax-checkpoint-tmp-*``) that killed
    saves left in an orbax manager directory; returns their names."""
    directory = epath.Path(directory)
    if not files.is_writer() or not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if ORBAX_TMP_MARK in p.name)
    for path in stale:
        path.rmtree() if path.is_dir() else path.unlink()
    if stale:
        log.info("removed %d unfinished checkpoint save(s) in %s", len(stale), directory)
    return [p.name for p in stale]


@contextlib.contextmanager
def _save_errors(path):
    """Turn any failure of a checkpoint write into a CheckpointError naming ``path``."""
    try:
        yield
    except Exception as err:  # orbax wraps I/O errors in many types
        if disk_full(err):
            raise CheckpointError(f"disk full while writing the checkpoint {path}: free space "
                                  f"and run the same command to resume.") from err
        raise CheckpointError(f"could not write the checkpoint {path}: "
                              f"{type(err).__name__}: {err}") from err


class StageCheckpointer:
    """Save/restore the resumable state of one training stage (see module docstring)."""

    def __init__(self, stage_dir: epath.PathLike, spec: dict, config: dict):
        self.stage_dir = epath.Path(stage_dir)
        self.spec = spec
        self.config = config
        for name in (LAST_DIR, BEST_DIR):
            remove_unfinished_saves(self.stage_dir / name)
        self._last = _manager(self.stage_dir / LAST_DIR, max_to_keep=2)
        self._best = _manager(self.stage_dir / BEST_DIR, max_to_keep=None)  # pruned by hand

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None for a fresh stage."""
        return self._last.latest_step()

    def save(self, state, data_state: Any, progress: dict, is_best: bool) -> None:
        """Write the best checkpoint (when ``is_best``), then the resume checkpoint at
        ``state.step``, then drop every best step other than ``progress['best_step']``.

        progress: JSON-able counters such as {'epoch', 'best_val_top1', 'best_step'}.
        """
        step = int(jax.device_get(state.step))
        meta = {"model": self.spec, "config": self.config, "progress": progress}
        if is_best:
            with _save_errors(self.stage_dir / BEST_DIR / str(step)):
                self._best.save(step, force=True, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"params": state.params,
                                                 "batch_stats": state.batch_stats}),
                    meta=ocp.args.JsonSave(meta)))
            crash_point("between_saves", step)
        with _save_errors(self.stage_dir / LAST_DIR / str(step)):
            self._last.save(step, force=True, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"iterator": data_state}),
                meta=ocp.args.JsonSave(meta)))
        crash_point("after_saves", step)
        self._keep_best(progress.get("best_step"), step)

    def _keep_best(self, best_step: int | None, step: int) -> None:
        """Delete the best checkpoints other than ``best_step`` (all those after ``step``
        when the checkpoint predates ``best_step`` records)."""
        for s in self._best.all_steps():
            if s != best_step and (best_step is not None or s > step):
                self._best.delete(s)

    def restore(self, abstract_state) -> tuple[Any, Any, dict]:
        """Restore the newest readable checkpoint into the structure/shardings of
        ``abstract_state``; returns (state, data_iterator_state, progress).

        An unreadable checkpoint is moved to ``damaged/`` and the previous one is tried.
        Raises CheckpointError for a checkpoint of another model or when none is
        readable, ConfigChangedError for a changed training config.
        """
        for step in sorted(self._last.all_steps(), reverse=True):
            path = self.stage_dir / LAST_DIR / str(step)
            try:
                meta = _read_meta(self._last, step, path)
            except CheckpointError as err:
                self._set_aside(step, err)
                continue
            check_compatible(meta["model"], self.spec, str(path))
            check_same_config(meta["config"], self.config, path)
            try:
                restored = self._last.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
            except Exception as err:  # orbax raises many types for a damaged tree
                self._set_aside(step, CheckpointError(f"{type(err).__name__}: {err}"))
                continue
            progress = self._reconcile_best(step, dict(meta["progress"]))
            return restored.state, restored.data["iterator"], progress
        raise CheckpointError(
            f"no readable checkpoint is left in {self.stage_dir / LAST_DIR}; the damaged ones "
            f"were moved to {self.stage_dir / DAMAGED_DIR}. Run the same command again to "
            f"train this stage from the beginning, or start with a fresh --workdir.")

    def _set_aside(self, step: int, err: Exception) -> None:
        """Move the unreadable checkpoint ``step`` to ``damaged/`` (never delete it)."""
        source = self.stage_dir / LAST_DIR / str(step)
        target = self.stage_dir / DAMAGED_DIR / f"{LAST_DIR}-{step}-{int(time.time())}"
        if files.is_writer():
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        self._last.reload()
        log.warning("checkpoint %s is unreadable (%s); moved it to %s and trying the previous "
                    "checkpoint", source, err, target)

    def _reconcile_best(self, step: int, progress: dict) -> dict:
        """Bring ``best/`` to the best step the resumed checkpoint expects (see module
        docstring); returns ``progress``, reset so that the next evaluation writes a new
        best checkpoint if the expected one is missing."""
        best_step = progress.get("best_step")
        self._keep_best(best_step, step)
        if best_step is not None and best_step not in self._best.all_steps():
            log.warning("best checkpoint %s is missing; the next evaluation writes a new one",
                        self.stage_dir / BEST_DIR / str(best_step))
            progress.update(best_step=None, best_val_top1=-1.0)
        return progress

    def close(self) -> None:
        self._last.close()
        self._best.close()


def _read_meta(manager, step: int, path) -> dict:
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as err:
        raise CheckpointError(
            f"checkpoint metadata at {path} is unreadable ({type(err).__name__}: {err}); "
            f"it is not a kdjax checkpoint or it is damaged."
        ) from err


def find_checkpoint(path: epath.PathLike, prefer: str = BEST_DIR) -> tuple[epath.Path, int]:
    """Resolve a user-given checkpoint path to (manager directory, step).

    Accepts a stage directory (uses ``prefer`` — ``best/`` by default — if present,
    else the other one), a manager directory, or a single step directory.
    """
    path = files.as_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    order = [BEST_DIR, LAST_DIR] if prefer == BEST_DIR else [LAST_DIR, BEST_DIR]
    candidates = [path / order[0], path / order[1], path]
    for directory in candidates:
        if directory.is_dir():
            steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
            if steps:
                return directory, steps[-1]
    if path.name.isdigit() and (path / "meta").exists():
        return path.parent, int(path.name)
    raise CheckpointError(
        f"no kdjax checkpoint found under {path} (looked in {BEST_DIR}/, {LAST_DIR}/ and the "
        f"path itself). Point --config.teacher.checkpoint at a stage directory such as "
        f"WORKDIR/teacher."
    )


def _reader(directory):
    """A read-only manager over ``directory`` that can report the arrays' metadata."""
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def read_spec(path, prefer: str = BEST_DIR) -> dict:
    """The model spec stored with a kdjax checkpoint (reads metadata only, no array)."""
    directory, step = find_checkpoint(path, prefer)
    return _read_meta(_reader(directory), step, directory / str(step))["model"]


def load_variables(path: epath.PathLike, prefer: str = BEST_DIR) -> tuple[dict, dict]:
    """Load ``(model_spec, {'params', 'batch_stats'})`` from a kdjax checkpoint for inference.

    For a stage directory, ``prefer`` picks the best-on-validation (default) or the
    last checkpoint. The arrays land on this process's first device whatever the
    device topology of the run that saved them.
    """
    directory, step = find_checkpoint(path, prefer)
    manager = _reader(directory)
    where = directory / str(step)
    meta = _read_meta(manager, step, where)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        saved = manager.item_metadata(step).state
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              dict(saved))
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
    except Exception as err:
        raise CheckpointError(f"could not read the arrays of {where}: {err}") from err
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    return meta["model"], variables


def load_meta(path: epath.PathLike, prefer: str = BEST_DIR) -> tuple[dict, int]:
    """``(meta, step)`` of the checkpoint ``load_variables(path, prefer)`` reads; meta =
    {'model': spec, 'config': the run's full config, 'progress': counters}."""
    directory, step = find_checkpoint(path, prefer)
    return _read_meta(_reader(directory), step, directory / str(step)), step


def save_variables(stage_dir, spec: dict, variables: dict, config: dict) -> None:
    """Write ``{'params', 'batch_stats'}`` as a stage directory's ``best/0`` checkpoint, so
    ``load_variables(stage_dir)`` and ``--config.teacher.checkpoint=stage_dir`` read it
    (used for teachers made elsewhere, e.g. by ``kdjax.convert_torch``)."""
    meta = {"model": spec, "config": config, "progress": {}}
    manager = _manager(epath.Path(stage_dir) / BEST_DIR, max_to_keep=1)
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(variables),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    manager.close()
