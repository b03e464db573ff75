"""Checkpoints of a training stage: state + data-iterator state + metadata, via orbax.

Layout under a stage directory ``workdir/<stage>/``:

    checkpoints/<step>/   the latest two checkpoints (state, data, meta) — resume point
    best/<step>/          the checkpoint with the best validation top-1 so far

orbax writes each checkpoint into a temporary directory and renames it only once
every item is committed, so an interrupted save never replaces a good checkpoint;
the previous one is kept as well (``max_to_keep=2``) as a fallback.

``meta`` holds the model spec ({'name', 'num_classes', 'widths', 'input_shape'}),
the full config and progress counters. It is checked before any array is read, so
a checkpoint of another model fails with a message instead of a tree mismatch.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

LAST_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the configured model."""


def model_spec(name: str, num_classes: int, input_shape, widths=None) -> dict:
    """The JSON-able description that rebuilds a model: ``get_model(name, num_classes, widths)``."""
    return {
        "name": name,
        "num_classes": int(num_classes),
        "widths": dict(widths or {}),
        "input_shape": [int(d) for d in input_shape],
    }


def _manager(directory: pathlib.Path, max_to_keep: int, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(directory, options=options)


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


class StageCheckpointer:
    """Save/restore the resumable state of one training stage (see module docstring)."""

    def __init__(self, stage_dir: pathlib.Path | str, spec: dict, config: dict):
        self.stage_dir = pathlib.Path(stage_dir)
        self.spec = spec
        self.config = config
        self._last = _manager(self.stage_dir / LAST_DIR, max_to_keep=2)
        self._best = _manager(self.stage_dir / BEST_DIR, max_to_keep=1)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None for a fresh stage."""
        return self._last.latest_step()

    def save(self, state, data_state: Any, progress: dict, is_best: bool) -> None:
        """Write the resume checkpoint (and the best one when ``is_best``) at ``state.step``.

        progress: JSON-able counters such as {'epoch', 'best_val_top1'}.
        """
        step = int(jax.device_get(state.step))
        meta = {"model": self.spec, "config": self.config, "progress": progress}
        items = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"iterator": data_state}),
            meta=ocp.args.JsonSave(meta),
        )
        self._last.save(step, args=items, force=True)
        if is_best:
            best_items = ocp.args.Composite(
                state=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
                meta=ocp.args.JsonSave(meta),
            )
            self._best.save(step, args=best_items, force=True)

    def restore(self, abstract_state) -> tuple[Any, Any, dict]:
        """Restore the latest checkpoint into the structure/shardings of ``abstract_state``.

        Returns (state, data_iterator_state, progress). Raises CheckpointError with
        the path and a remedy if the checkpoint is of another model or unreadable.
        """
        step = self._last.latest_step()
        path = self.stage_dir / LAST_DIR / str(step)
        meta = _read_meta(self._last, step, path)
        check_compatible(meta["model"], self.spec, str(path))
        try:
            restored = self._last.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # orbax raises many types for a damaged tree
            raise CheckpointError(
                f"could not restore the checkpoint at {path}: {type(err).__name__}: {err}. "
                f"If it is damaged, delete that step directory to resume from the previous "
                f"checkpoint, or start again with a fresh --workdir."
            ) from err
        return restored.state, restored.data["iterator"], meta["progress"]

    def close(self) -> None:
        self._last.close()
        self._best.close()


def _read_meta(manager, step: int, path: pathlib.Path) -> dict:
    try:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as err:
        raise CheckpointError(
            f"checkpoint metadata at {path} is unreadable ({type(err).__name__}: {err}); "
            f"it is not a kdjax checkpoint or it is damaged."
        ) from err


def find_checkpoint(path: pathlib.Path | str, prefer: str = BEST_DIR) -> tuple[pathlib.Path, int]:
    """Resolve a user-given checkpoint path to (manager directory, step).

    Accepts a stage directory (uses ``prefer`` — ``best/`` by default — if present,
    else the other one), a manager directory, or a single step directory.
    """
    path = pathlib.Path(path).expanduser()
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


def load_variables(path: pathlib.Path | str, prefer: str = BEST_DIR) -> tuple[dict, dict]:
    """Load ``(model_spec, {'params', 'batch_stats'})`` from a kdjax checkpoint for inference.

    For a stage directory, ``prefer`` picks the best-on-validation (default) or the
    last checkpoint.
    """
    directory, step = find_checkpoint(path, prefer)
    manager = _manager(directory, max_to_keep=None, read_only=True)
    where = directory / str(step)
    meta = _read_meta(manager, step, where)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as err:
        raise CheckpointError(f"could not read the arrays of {where}: {err}") from err
    state = restored.state
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    return meta["model"], variables


def save_json(path: pathlib.Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def save_variables(stage_dir, spec: dict, variables: dict, config: dict) -> None:
    """Write ``{'params', 'batch_stats'}`` as a stage directory's ``best/0`` checkpoint, so
    ``load_variables(stage_dir)`` and ``--config.teacher.checkpoint=stage_dir`` read it
    (used for teachers made elsewhere, e.g. by ``kdjax.convert_torch``)."""
    meta = {"model": spec, "config": config, "progress": {}}
    manager = _manager(pathlib.Path(stage_dir) / BEST_DIR, max_to_keep=1)
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(variables),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    manager.close()
