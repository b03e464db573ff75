"""Command line: ``python -m kdjax.main --config=configs/<name>.py[:preset] --workdir=DIR``.

``config.pipeline`` selects ``kdjax.pipelines.<name>.run(config, workdir)`` through the
PIPELINES dict below. Overrides: ``--config.key=value`` (an unknown key fails).
Re-running with the same --workdir resumes every stage from its last checkpoint; a
relative --workdir is made absolute at start-up, and one run at a time holds it
(``WORKDIR/.kdjax.lock``). Every error is one line ``kdjax: error: ...`` on stderr.
Exit codes: 0 done; 1 a run-time failure (non-finite loss/state/evaluation, no
readable checkpoint, disk full, workdir in use by another run); 2 bad configuration
or missing/damaged dataset (flags, config values, workdir path, changed config on
resume); 143 stopped by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import pathlib
import sys
import tempfile

from kdjax import platform

platform.configure_cpu_devices()  # before anything imports JAX

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kdjax import models  # noqa: E402
from kdjax.data import MissingDatasetError  # noqa: E402
from kdjax.pipelines import cascaded, cross_layer, dynamic_kd, emo_pms, kd, pdd, supervised  # noqa: E402,E501
from kdjax.train import checkpoint as ckpt_lib  # noqa: E402
from kdjax.train.loop import Preempted  # noqa: E402

PIPELINES = {
    "supervised": supervised.run,
    "cascaded": cascaded.run,
    "dynamic_kd": dynamic_kd.run,
    "emo_pms": emo_pms.run,
    "kd": kd.run,
    "pdd": pdd.run,
    "cross_layer": cross_layer.run,
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file (configs/*.py[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")

EXIT_RUNTIME, EXIT_CONFIG, EXIT_PREEMPTED = 1, 2, 143
log = std_logging.getLogger("kdjax")


def model_name_keys(config) -> list[tuple[str, str]]:
    """(dotted key, model name) for every '<section>.name' naming a zoo model."""
    found = []
    for section in ("model", "student", "teacher"):
        if section in config and "name" in config[section]:
            found.append((f"{section}.name", config[section].name))
    return found


# Epoch counts of optional stages, where 0 means "skip the stage".
OPTIONAL_STAGE_EPOCHS = frozenset({"cascade.finetune.epochs"})


def validate(config) -> None:
    """Fail before any work (ValueError naming the key) on an unknown pipeline or model,
    a non-positive epoch count or logging interval, or a teacher checkpoint of another
    model than ``teacher.name``."""
    if config.pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {config.pipeline!r}; valid: {sorted(PIPELINES)}")
    for key, name in model_name_keys(config):
        if name not in models.MODEL_NAMES:
            raise ValueError(f"{key}={name!r} is not a kdjax model; valid: {', '.join(models.MODEL_NAMES)}")
    for key, value in _items(config.to_dict()):
        low = 0 if key in OPTIONAL_STAGE_EPOCHS else 1
        if key.rsplit(".", 1)[-1] == "epochs" and value < low:
            raise ValueError(f"{key}={value}: the number of epochs must be >= {low}")
    minimum = {"log_every_steps": 1, "eval_batch_size": 1, "eval_every_steps": 0, "max_steps": 0}
    for key, low in minimum.items():
        if config.train[key] < low:
            raise ValueError(f"train.{key}={config.train[key]} must be >= {low}")
    if "teacher" in config and config.teacher.checkpoint:
        try:
            saved = ckpt_lib.read_spec(config.teacher.checkpoint)["name"]
        except ckpt_lib.CheckpointError as err:
            raise ValueError(f"teacher.checkpoint: {err}") from None
        if saved != config.teacher.name:
            raise ValueError(
                f"teacher.name={config.teacher.name!r} but teacher.checkpoint="
                f"{config.teacher.checkpoint} holds a {saved!r} model; set "
                f"--config.teacher.name={saved} or point teacher.checkpoint at a "
                f"{config.teacher.name} checkpoint.")


def _items(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def resolve_workdir(workdir: str | None) -> pathlib.Path:
    """The absolute, writable directory for ``--workdir`` (created if absent).

    Raises ValueError for an empty value, a path that is a file, or a directory that
    cannot be created or written.
    """
    if not workdir or not workdir.strip():
        raise ValueError("--workdir is empty: give the directory for checkpoints and results")
    path = pathlib.Path(os.path.abspath(os.path.expanduser(workdir)))
    if path.exists() and not path.is_dir():
        raise ValueError(f"--workdir={path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"--workdir={path} is not a writable directory ({err.strerror})") from None
    return path


def exit_code(err: BaseException) -> int | None:
    """The exit code the README gives for ``err``; None for an unexpected error."""
    if ckpt_lib.disk_full(err):
        return EXIT_RUNTIME
    if isinstance(err, (ValueError, KeyError, MissingDatasetError)):
        return EXIT_CONFIG
    if isinstance(err, (ckpt_lib.CheckpointError, ckpt_lib.WorkdirBusyError, FloatingPointError)):
        return EXIT_RUNTIME
    return None


def run(config, workdir: str | None) -> int:
    """Check the config and workdir, hold the workdir's lock, run the pipeline (it prints
    its own summary); returns the exit code (errors are printed as one line)."""
    try:
        validate(config)
        path = resolve_workdir(workdir)
        log.info("workdir %s", path)
        lock = (contextlib.nullcontext() if config.train.distributed  # see BUILD_NOTES
                else ckpt_lib.WorkdirLock(path))
        with lock:
            results = PIPELINES[config.pipeline](config, path)
    except Preempted as err:
        print(f"kdjax: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as err:  # noqa: BLE001 — mapped to the documented exit codes
        code = exit_code(err)
        if code is None:
            raise
        logging.debug("failed", exc_info=True)
        prefix = "disk full: " if ckpt_lib.disk_full(err) and "disk full" not in str(err) else ""
        print(f"kdjax: error: {prefix}{err}", file=sys.stderr)
        return code
    del results  # each pipeline printed its summary and wrote it under the workdir
    print(f"kdjax: done; results under {path}", file=sys.stderr)
    return 0


def configure_logging() -> None:
    """kdjax's own progress lines at INFO on stderr; other libraries (orbax, absl) only errors."""
    logging.set_verbosity(logging.ERROR)  # orbax warns about benign restore details
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    kdjax_log = std_logging.getLogger("kdjax")
    kdjax_log.handlers[:] = [handler]
    kdjax_log.setLevel(std_logging.INFO)
    kdjax_log.propagate = False


def main(argv) -> int:
    configure_logging()
    if len(argv) > 1:
        print(f"kdjax: error: unexpected arguments: {argv[1:]}", file=sys.stderr)
        return EXIT_CONFIG
    if _CONFIG.value is None or _WORKDIR.value is None:
        print("kdjax: error: both --config=configs/<name>.py[:preset] and --workdir=DIR are "
              "required", file=sys.stderr)
        return EXIT_CONFIG
    return run(_CONFIG.value, _WORKDIR.value)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; an unknown flag or config key, an unknown preset or a badly
    typed value is printed as one line and exits 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 — config files raise anything while loading
        print(f"kdjax: error: {flag_error_message(err, argv)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def flag_error_message(err: Exception, argv: list[str]) -> str:
    """One line for a flag-parsing error; an unknown config key names its flag, an error
    raised inside a config file is given without the traceback ml_collections adds."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    root = chain[-1]
    if isinstance(root, KeyError) and root.args:
        key = str(root.args[0])
        used = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key in a]
        hints = [line for e in chain for line in str(e.args[0] if e.args else "").splitlines()
                 if line.startswith("Did you mean")]
        return " ".join([f"unknown config key {', '.join(used) or key}.", *hints[:1]])
    text = str(root if "Traceback" in str(err) else err)  # ml_collections inlines tracebacks
    return " ".join(text.split()) or type(err).__name__


def entry() -> None:
    """Console entry point ``kdjax``."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
