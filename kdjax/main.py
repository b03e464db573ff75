"""Command line: ``python -m kdjax.main --config=configs/<name>.py[:preset] --workdir=DIR``.

``config.pipeline`` selects ``kdjax.pipelines.<name>.run(config, workdir)`` through the
PIPELINES dict below. Overrides: ``--config.key=value`` (an unknown key fails).
Re-running with the same --workdir resumes every stage from its last checkpoint.
Exit codes: 0 done; 1 a run-time failure (NaN loss, damaged checkpoint); 2 bad
configuration or missing data; 143 stopped by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import json
import sys

from kdjax import platform

platform.configure_cpu_devices()  # before anything imports JAX

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from kdjax import models  # noqa: E402
from kdjax.data import MissingDatasetError  # noqa: E402
from kdjax.pipelines import cross_layer, dynamic_kd, emo_pms, kd, pdd, supervised  # noqa: E402
from kdjax.train.checkpoint import CheckpointError  # noqa: E402
from kdjax.train.loop import Preempted  # noqa: E402

PIPELINES = {
    "supervised": supervised.run,
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


def model_name_keys(config) -> list[tuple[str, str]]:
    """(dotted key, model name) for every '<section>.name' naming a zoo model."""
    found = []
    for section in ("model", "student", "teacher"):
        if section in config and "name" in config[section]:
            found.append((f"{section}.name", config[section].name))
    return found


def validate(config) -> None:
    """Fail before any work if the pipeline or a model name is unknown."""
    if config.pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {config.pipeline!r}; valid: {sorted(PIPELINES)}")
    for key, name in model_name_keys(config):
        if name not in models.MODEL_NAMES:
            raise ValueError(f"{key}={name!r} is not a kdjax model; valid: {', '.join(models.MODEL_NAMES)}")


def configure_logging() -> None:
    """kdjax's own progress lines at INFO on stderr; other libraries (orbax, absl) only warn."""
    import logging as std_logging

    logging.set_verbosity(logging.WARNING)
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    kdjax_log = std_logging.getLogger("kdjax")
    kdjax_log.handlers[:] = [handler]
    kdjax_log.setLevel(std_logging.INFO)
    kdjax_log.propagate = False


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None or _WORKDIR.value is None:
        raise app.UsageError("both --config=configs/<name>.py[:preset] and --workdir=DIR are required")
    configure_logging()
    try:
        validate(config)
        results = PIPELINES[config.pipeline](config, _WORKDIR.value)
    except (ValueError, MissingDatasetError, KeyError) as err:
        logging.debug("configuration error", exc_info=True)
        print(f"kdjax: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except (CheckpointError, FloatingPointError) as err:
        print(f"kdjax: error: {err}", file=sys.stderr)
        return EXIT_RUNTIME
    except Preempted as err:
        print(f"kdjax: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    print(json.dumps(results, indent=2, default=str))
    return 0


def entry() -> None:
    """Console entry point ``kdjax``."""
    app.run(main)


if __name__ == "__main__":
    entry()
