"""Pipeline ``supervised``: train one model (a teacher or a student) from scratch with CE."""

from __future__ import annotations

import logging

from kdjax.pipelines import common

log = logging.getLogger("kdjax")


def run(config, workdir) -> dict:
    """Train ``config.model.name`` with ``config.optim`` under ``workdir/<config.model.stage>``."""
    ctx = common.setup(config, workdir)
    _, results = common.run_stage(ctx, config.model.stage, config.model.name, config.optim,
                                  common.supervised_objective)
    log.info("[%s] %s test top-1 %.2f (last epoch), %.2f (best epoch)", config.model.stage,
                 config.model.name, results["test_top1_last"], results["test_top1_best_epoch"])
    return {config.model.stage: results}
