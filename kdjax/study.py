"""Command line: ``python -m kdjax.study --config=configs/study.py[:quick] --workdir=DIR``.

Runs a grid of (comparison, variant, seed) as ordinary kdjax runs (the same
``kdjax.main.PIPELINES[...](config, workdir)`` call as ``python -m kdjax.main``, in this
process), each under ``DIR/<comparison>/<variant>/seed<k>/``, and writes ``DIR/study.md``
and one PNG per comparison.

- The protocol's teacher is trained once (``DIR/teacher``) and every run that has a
  ``teacher`` section gets ``teacher.checkpoint`` pointing at it.
- Variants whose resolved configs are identical share one run (e.g. the student alone and
  KD both come from one ``configs/kd.py`` run with ``kd.baseline=True``).
- ``workers`` (default 1): cells after the teacher train that many at a time, each in its
  own child process (one JAX run keeps about 1.25 of 2 CPU cores busy; on a larger machine
  several cells share it). SIGTERM stops them all with checkpoints saved.
- Resumable: a run whose ``study_result.json`` exists is skipped; an unfinished run is
  started again in its directory, so its stages resume from their checkpoints.
- Everything is resolved and checked before the first run: an unknown override key or an
  unknown ``distill.method`` fails at start-up (exit 2). A variant whose config file does
  not exist, or that ``requires`` a config key the config lacks (a feature not on this
  branch), is skipped with the reason logged and listed in study.md.

The study config (see ``configs/study.py``) holds ``seeds``, ``workers``, ``overrides`` (applied to every
run, the teacher's included), ``teacher`` (``config``, ``overrides``, ``seed``, ``stage``)
and ``comparisons``: a tuple of ``{name, kind ("distill" | "pruning"), baseline,
description, overrides, variants}``, each variant ``{name, config, overrides, requires,
result, best, macs}`` where ``result``/``best``/``macs`` are dotted paths into the dict the
pipeline returns (``best``/``macs`` may be "").
"""

from __future__ import annotations

from kdjax import platform

platform.configure_cpu_devices()  # before anything imports JAX

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from kdjax import reports  # noqa: E402

log = logging.getLogger("kdjax")

# In a ``teachers`` list (cross_layer): stands for the study's shared teacher checkpoint.
SHARED_TEACHER = "<study teacher>"
RESULT_FILE = "study_result.json"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1..30 (standard table
# values, rounded to 3 decimals). Beyond 30 the df = 30 value is used (slightly wider
# than exact: conservative).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


# ---------------------------------------------------------------------------------------
# Statistics (pure functions of Python floats)
# ---------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation s = sqrt(Σ(x − x̄)² / (n − 1)).
    n = 1 gives s = nan (no spread can be estimated); n = 0 raises ValueError."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def paired_differences(variant: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """variant[s] − baseline[s] for every seed s present in both, in seed order."""
    return [variant[s] - baseline[s] for s in sorted(set(variant) & set(baseline))]


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the two-sided 95 % quantile of Student's t with ``df`` ≥ 1."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T_975[min(df, len(T_975)) - 1]


def t_interval(diffs: Sequence[float]) -> dict[str, float]:
    """95 % t-interval of the mean of paired differences d_1..d_n:
    d̄ ± t_{0.975, n−1} · s/√n. Returns {mean, se, low, high, n}; se/low/high are nan
    when n < 2."""
    n = len(diffs)
    mean, std = mean_std(diffs)
    if n < 2:
        return {"mean": mean, "se": math.nan, "low": math.nan, "high": math.nan, "n": n}
    se = std / math.sqrt(n)
    half = t_quantile_975(n - 1) * se
    return {"mean": mean, "se": se, "low": mean - half, "high": mean + half, "n": n}


# ---------------------------------------------------------------------------------------
# Resolving the grid
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """One (comparison, variant, seed) cell: its resolved config and where it runs."""

    comparison: str
    variant: str
    seed: int
    dir: pathlib.Path
    config: Any = None          # resolved ConfigDict (None when skipped)
    result: str = ""
    best: str = ""
    macs: str = ""
    skipped: str = ""           # reason, "" = runs
    report_only: bool = False   # outside ``study.only``: reported if finished, never trained
    images_per_step: int = 0    # distill comparisons: the stage's batch size (for img/s)

    @property
    def label(self) -> str:
        return f"{self.comparison}/{self.variant}/seed{self.seed}"


def resolve_path(spec: str) -> pathlib.Path:
    """The file of a ``path.py[:preset]`` spec, relative to the CWD or the repository."""
    path = pathlib.Path(spec.split(":", 1)[0])
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    return path


def load_config(spec: str):
    """``get_config(preset)`` of the config file named by ``path.py[:preset]``."""
    path = resolve_path(spec)
    preset = spec.split(":", 1)[1] if ":" in spec else ""
    if not path.exists():
        raise FileNotFoundError(f"config file {spec.split(':', 1)[0]} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_study_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset)


def has_key(config, dotted: str) -> bool:
    """Whether ``config`` has the (possibly nested) key ``a.b.c``."""
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def apply_overrides(config, overrides: Sequence[tuple[str, Any]], where: str) -> None:
    """Set each ``(dotted key, value)`` on the (locked) ConfigDict; an unknown key raises
    ValueError naming it, ``where`` it came from and the valid keys at that level."""
    for key, value in overrides:
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                raise ValueError(f"{where}: override {key}={value!r}: no key {part!r} under "
                                 f"{'.'.join(parts[:i]) or 'the top level'}; valid: {valid}")
            if i < len(parts) - 1:
                node = node[part]
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: override {key}={value!r}: {err}") from err


def check_distill_method(config, where: str) -> None:
    """An unknown ``distill.method`` fails now, not when its run starts."""
    if not has_key(config, "distill.method"):
        return
    from kdjax.distill import METHODS  # only exists where the distill section does

    if config.distill.method not in METHODS:
        raise ValueError(f"{where}: unknown distill.method {config.distill.method!r}; "
                         f"valid: {', '.join(sorted(METHODS))}")


def teacher_run(study, workdir: pathlib.Path) -> Run:
    """The protocol's teacher, trained once under ``workdir/teacher``."""
    spec = study.teacher
    config = load_config(spec.config)
    config.unlock()
    apply_overrides(config, study.overrides, "study.overrides")
    apply_overrides(config, spec.overrides, "teacher.overrides")
    config.seed = spec.seed
    config.lock()
    return Run("teacher", spec.stage, spec.seed, workdir / "teacher", config,
               result=f"{spec.stage}.test_top1_last", best=f"{spec.stage}.test_top1_best_epoch")


def build_runs(study, workdir: pathlib.Path) -> tuple[Run, list[Run]]:
    """Resolve every cell of the grid (seed-major order); raise ValueError on a bad entry."""
    from kdjax import main as kdjax_main

    teacher = teacher_run(study, workdir)
    kdjax_main.validate(teacher.config)
    checkpoint = str(teacher.dir / study.teacher.stage)
    teacher_name = kdjax_main.model_name_keys(teacher.config)[0][1]
    seeds = tuple(int(s) for s in study.seeds)
    if not seeds:
        raise ValueError("study.seeds is empty")
    runs = []
    names = [c.name for c in study.comparisons]
    if len(set(names)) != len(names):
        raise ValueError(f"comparison names must be unique: {names}")
    only = tuple(study.get("only", ()))
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"study.only names unknown comparisons {unknown}; valid: {names}")
    for seed in seeds:
        for comp in study.comparisons:
            variant_names = [v.name for v in comp.variants]
            if comp.baseline not in variant_names:
                raise ValueError(f"comparison {comp.name!r}: baseline {comp.baseline!r} is "
                                 f"not one of its variants {variant_names}")
            if comp.kind not in ("distill", "pruning"):
                raise ValueError(f"comparison {comp.name!r}: kind {comp.kind!r}; valid: "
                                 f"distill, pruning")
            for var in comp.variants:
                run = resolve_variant(study, comp, var, seed, workdir, checkpoint,
                                      teacher_name)
                run.report_only = bool(only) and comp.name not in only
                runs.append(run)
    return teacher, runs


def resolve_variant(study, comp, var, seed: int, workdir: pathlib.Path,
                    checkpoint: str, teacher_name: str) -> Run:
    """One grid cell with its config built and checked, or marked skipped with a reason."""
    where = f"{comp.name}/{var.name}"
    run = Run(comp.name, var.name, seed, workdir / comp.name / var.name / f"seed{seed}",
              result=var.result, best=var.best, macs=var.macs)
    if not resolve_path(var.config).exists():
        run.skipped = f"{var.config.split(':', 1)[0]} is not on this branch"
        return run
    config = load_config(var.config)
    missing = [k for k in var.requires if not has_key(config, k)]
    if missing:
        run.skipped = f"{var.config} has no key {', '.join(missing)} (not on this branch)"
        return run
    config.unlock()
    apply_overrides(config, study.overrides, "study.overrides")
    apply_overrides(config, comp.overrides, f"{comp.name}.overrides")
    apply_overrides(config, var.overrides, f"{where}.overrides")
    config.seed = seed
    from kdjax import main as kdjax_main

    kdjax_main.validate(config)  # before teacher.checkpoint is set: it is trained later
    if "teachers" in config and var.shared_teacher:   # cross_layer: a list of teachers
        config.teachers = tuple(checkpoint if t == SHARED_TEACHER else t
                                for t in config.teachers)
    if "teacher" in config and var.shared_teacher:
        if config.teacher.name != teacher_name:
            raise ValueError(f"{where}: teacher.name={config.teacher.name!r} but the study's "
                             f"shared teacher is a {teacher_name!r}")
        config.teacher.checkpoint = checkpoint
    config.lock()
    check_distill_method(config, where)
    run.config = config
    run.images_per_step = int(config.optim.batch_size) if comp.kind == "distill" else 0
    return run


def share_identical(runs: list[Run]) -> None:
    """Point runs whose resolved configs are identical at the first one's directory."""
    first: dict[str, pathlib.Path] = {}
    for run in runs:
        if run.config is None:
            continue
        key = json.dumps(run.config.to_dict(), sort_keys=True, default=str)
        run.dir = first.setdefault(key, run.dir)


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------

def lookup(results: dict, dotted: str):
    """``results[a][b]...`` for ``a.b...``; integer parts index lists (``levels.-1.macs``).
    Raises KeyError naming the missing part and the keys available there."""
    node = results
    for part in dotted.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            keys = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise KeyError(f"result path {dotted!r}: no {part!r} (available: {keys})")
    return node


def finished_result(run: Run) -> dict | None:
    """The stored ``study_result.json`` of a finished cell, None when it has not finished;
    ValueError when it was made with another config than the cell's."""
    from kdjax.train import checkpoint as ckpt_lib

    done = run.dir / RESULT_FILE
    if not done.exists():
        return None
    config = run.config.to_dict()
    stored = json.loads(done.read_text())
    changes = ckpt_lib.config_changes(stored.get("config", config), config)
    if changes:
        listed = "; ".join(f"{k}: run {a!r}, now {b!r}" for k, (a, b) in changes.items())
        raise ValueError(f"the finished run in {run.dir} was made with another config "
                         f"({listed}); if only a path differs, the study directory was "
                         f"moved or renamed: use its old path; otherwise move that run "
                         f"directory away to rerun it")
    return stored


def execute(run: Run) -> dict:
    """Run one cell's pipeline in this process (the ``python -m kdjax.main`` code path) and
    store what the study needs in ``study_result.json``; a finished run is not rerun."""
    from kdjax import main as kdjax_main
    from kdjax.train import checkpoint as ckpt_lib
    from kdjax.train import files

    stored = finished_result(run)
    if stored is not None:
        return stored
    done = run.dir / RESULT_FILE
    config = run.config.to_dict()
    run.dir.mkdir(parents=True, exist_ok=True)
    log.info("[study] running %s in %s", run.label, run.dir)
    with ckpt_lib.WorkdirLock(run.dir):  # two studies on one workdir: never one run twice
        results = kdjax_main.PIPELINES[run.config.pipeline](run.config, str(run.dir))
    results = json.loads(json.dumps(results, default=str))
    files.save_json(done, {"results": results, "config": config})
    return {"results": results}


def execute_here(run: Run) -> dict:
    """``execute`` in this process, then drop the compiled steps of its models (a long
    study in one process would otherwise keep every run's programs)."""
    import jax

    stored = execute(run)
    jax.clear_caches()
    return stored


def train_images_per_second(metrics_path: pathlib.Path, images_per_step: int) -> float | None:
    """Median over consecutive logged train records of images_per_step · Δstep / Δtime, from
    a stage's ``metrics.jsonl`` (intervals holding an evaluation, compilation or a resume
    are the outliers the median ignores); None with fewer than two train records."""
    if not metrics_path.exists():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [(r["step"], r["time"]) for r in records if r.get("split") == "train"]
    rates = [images_per_step * (s1 - s0) / (t1 - t0)
             for (s0, t0), (s1, t1) in zip(train, train[1:]) if s1 > s0 and t1 > t0]
    return statistics.median(rates) if rates else None


def extract(run: Run, stored: dict) -> dict:
    """{top1, best, macs, img_s} of one finished cell (best/macs None when not asked for;
    img_s, the stage's training images/s, only for distill comparisons)."""
    results = stored["results"]
    stage = run.result.split(".", 1)[0]
    return {"top1": float(lookup(results, run.result)),
            "best": float(lookup(results, run.best)) if run.best else None,
            "macs": float(lookup(results, run.macs)) if run.macs else None,
            "img_s": (train_images_per_second(run.dir / stage / "metrics.jsonl",
                                              run.images_per_step)
                      if run.images_per_step else None)}


def run_all(teacher: Run, runs: list[Run], on_result=None, workers: int = 1,
            start_method: str = "spawn") -> tuple[dict, list[str]]:
    """Train the teacher, then every cell (skipping finished ones). Returns
    ({(comparison, variant): {seed: {top1, best, macs}}}, failures). A run-time failure of
    one cell (NaN loss, damaged checkpoint, bad result path) is logged and the study goes
    on; SIGTERM (Preempted) stops it, to be resumed by rerunning.

    ``workers`` > 1: after the teacher, that many cells train at once, each in a fresh
    child process (``multiprocessing`` ``start_method``; see ``cells_in_parallel``)."""
    execute_here(teacher)
    todo = [run for run in runs if not (
        run.skipped or (run.report_only and not (run.dir / RESULT_FILE).exists()))]
    table: dict[tuple[str, str], dict[int, dict]] = {}
    failures = []
    outcomes = (cells_in_sequence(todo) if workers <= 1
                else cells_in_parallel(todo, workers, start_method))
    for run, stored, error in outcomes:
        if error is None:
            try:
                table.setdefault((run.comparison, run.variant), {})[run.seed] = extract(
                    run, stored)
            except KeyError as err:
                error = str(err)
        if error is not None:
            log.error("[study] %s failed: %s", run.label, error)
            failures.append(f"{run.label}: {error}")
        if on_result is not None:
            on_result(table, failures)
    return table, failures


def run_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that fail one cell and let the study go on."""
    from kdjax.train.checkpoint import CheckpointError, WorkdirBusyError

    return CheckpointError, WorkdirBusyError, FloatingPointError, KeyError, ValueError


def cells_in_sequence(runs: list[Run]):
    """Yields (run, stored, None) or (run, None, error message) per run, in this process."""
    for run in runs:
        try:
            yield run, execute_here(run), None
        except run_errors() as err:
            yield run, None, str(err)


PREEMPTED = "<preempted>"   # a child's error slot when its run stopped on SIGTERM


def _cell_process(run: Run, results) -> None:
    """Body of a child process: execute one cell and put (dir, stored, error) on
    ``results``; error is None, a message, or PREEMPTED."""
    from kdjax import main as kdjax_main
    from kdjax.train.loop import Preempted

    kdjax_main.configure_logging()
    try:
        results.put((str(run.dir), execute(run), None))
    except run_errors() as err:
        results.put((str(run.dir), None, str(err)))
    except Preempted:
        results.put((str(run.dir), None, PREEMPTED))


def cells_in_parallel(runs: list[Run], workers: int, start_method: str = "spawn"):
    """Like ``cells_in_sequence`` with up to ``workers`` cells training at once, one child
    process per cell (a fresh JAX each time); runs sharing a directory train once. Results
    come in completion order. SIGTERM to this process is passed on to the children, which
    checkpoint and stop; then Preempted is raised here. A child that dies without a result
    (kill -9, out of memory) fails its cell with its exit code."""
    import multiprocessing
    import queue
    import signal

    from kdjax.train.loop import Preempted

    context = multiprocessing.get_context(start_method)
    results = context.Queue()
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(str(run.dir), []).append(run)
    waiting = list(groups)
    alive: dict[str, Any] = {}
    stopping = []

    def forward_sigterm(signum, frame):
        stopping.append(signum)
        for process in alive.values():
            process.terminate()

    previous = signal.signal(signal.SIGTERM, forward_sigterm)
    try:
        while waiting or alive:
            while waiting and len(alive) < workers and not stopping:
                key = waiting.pop(0)
                alive[key] = context.Process(target=_cell_process,
                                             args=(groups[key][0], results))
                alive[key].start()
            if not alive:
                break
            try:
                key, stored, error = results.get(timeout=1.0)
            except queue.Empty:
                for key, process in list(alive.items()):
                    if not process.is_alive() and results.empty():
                        del alive[key]
                        for run in groups[key]:
                            yield run, None, (f"the run's process exited with code "
                                              f"{process.exitcode} without a result")
                continue
            alive.pop(key).join()
            if error == PREEMPTED:
                stopping.append(error)
                continue
            for run in groups[key]:
                yield run, stored, error
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in alive.values():
            process.terminate()
            process.join()
    if stopping:
        raise Preempted("SIGTERM: the running cells saved checkpoints")


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------

def fmt_mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_interval(diffs: Sequence[float]) -> str:
    if not diffs:
        return "—"
    t = t_interval(diffs)
    if t["n"] < 2:
        return f"{t['mean']:+.2f} (n = 1)"
    return f"{t['mean']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}]"


def comparison_rows(comp, table: dict) -> list[dict]:
    """Per variant: values per seed and paired differences against the baseline."""
    base = table.get((comp.name, comp.baseline), {})
    rows = []
    for var in comp.variants:
        cells = table.get((comp.name, var.name), {})
        top1 = {s: c["top1"] for s, c in cells.items()}
        best = {s: c["best"] for s, c in cells.items() if c["best"] is not None}
        macs = [c["macs"] for c in cells.values() if c["macs"] is not None]
        img_s = [c["img_s"] for c in cells.values() if c.get("img_s") is not None]
        rows.append({
            "name": var.name, "n": len(top1), "top1": top1, "best": best, "macs": macs,
            "img_s": img_s,
            "diff": paired_differences(top1, {s: c["top1"] for s, c in base.items()}),
            "diff_best": paired_differences(
                best, {s: c["best"] for s, c in base.items() if c["best"] is not None}),
        })
    return rows


def comparison_markdown(comp, rows: list[dict], skipped: dict[str, str], plot: str) -> str:
    """One comparison's section of study.md."""
    lines = [f"## {comp.name}", "", comp.description, "",
             f"| variant | n | test top-1 last (mean ± std) | best epoch (mean ± std) | "
             f"Δ last vs {comp.baseline} [95 % CI] | Δ best vs {comp.baseline} [95 % CI] | "
             f"MACs (M) | per seed (last) |",
             "|---|---|---|---|---|---|---|---|"]
    speed = comp.kind == "distill"   # + the training speed of each variant's stage
    if speed:
        lines[-2] += " train img/s (median over seeds) |"
        lines[-1] += "---|"
    for r in rows:
        if r["name"] in skipped:
            lines.append(f"| {r['name']} | 0 | skipped: {skipped[r['name']]} | | | | | |"
                         + (" |" if speed else ""))
            continue
        is_base = r["name"] == comp.baseline
        macs = f"{sum(r['macs']) / len(r['macs']) / 1e6:.2f}" if r["macs"] else "—"
        per_seed = ", ".join(f"{v:.2f}" for _, v in sorted(r["top1"].items())) or "—"
        lines.append(
            f"| {r['name']} | {r['n']} | {fmt_mean_std(list(r['top1'].values()))} | "
            f"{fmt_mean_std(list(r['best'].values()))} | "
            f"{'baseline' if is_base else fmt_interval(r['diff'])} | "
            f"{'baseline' if is_base else fmt_interval(r['diff_best'])} | {macs} | {per_seed} |"
            + (f" {statistics.median(r['img_s']):.0f} |" if speed and r["img_s"] else
               " — |" if speed else ""))
    if plot:
        lines += ["", f"![{comp.name}]({plot})"]
    return "\n".join(lines) + "\n"


def plot_comparison(comp, rows: list[dict], path: pathlib.Path) -> bool:
    """Bars with ±std error bars (distill) or accuracy against MACs (pruning, every variant
    on the same axes). Returns False when there is nothing to plot."""
    rows = [r for r in rows if r["top1"]]
    if not rows:
        return False
    stats = [mean_std(list(r["top1"].values())) for r in rows]
    reports.comparison_plot(path, comp, rows, stats)
    return True


def with_runs_finished_meanwhile(table: dict, runs: list[Run]) -> dict:
    """``table`` plus every cell it lacks whose result is on disk now: cells that another
    study process on the same workdir finished after this one listed its work. A stored
    result made with another config, or without the asked-for numbers, is left out (this
    process reports such a cell as failed only when it trains it itself)."""
    merged = {key: dict(seeds) for key, seeds in table.items()}
    for run in runs:
        if run.skipped or run.seed in merged.get((run.comparison, run.variant), {}):
            continue
        try:
            stored = finished_result(run)
            if stored is not None:
                merged.setdefault((run.comparison, run.variant), {})[run.seed] = extract(
                    run, stored)
        except (KeyError, ValueError):
            continue
    return merged


def write_report(study, teacher: Run, runs: list[Run], table: dict, failures: list[str],
                 workdir: pathlib.Path, plots: bool = True) -> str:
    """Write ``workdir/study.md`` (and the PNGs) from ``table`` and every other cell found
    finished on disk (``with_runs_finished_meanwhile``); returns the markdown."""
    table = with_runs_finished_meanwhile(table, runs)
    teacher_file = teacher.dir / RESULT_FILE
    teacher_line = "teacher: not trained yet"
    if teacher_file.exists():
        t = extract(teacher, json.loads(teacher_file.read_text()))
        teacher_line = (f"teacher ({study.teacher.config}, seed {teacher.seed}, shared by every "
                        f"run): test top-1 {t['top1']:.2f} (`{teacher.dir / teacher.variant}`)")
    parts = [f"# Study\n\n{study.description}\n\nseeds: {tuple(study.seeds)}; {teacher_line}.\n"
             "Δ = paired difference (same seed) against the comparison's baseline, mean "
             "with its 95 % t-interval.\n"]
    for comp in study.comparisons:
        skipped = {r.variant: r.skipped for r in runs
                   if r.comparison == comp.name and r.skipped}
        rows = comparison_rows(comp, table)
        plot = ""
        if plots and plot_comparison(comp, rows, workdir / f"{comp.name}.png"):
            plot = f"{comp.name}.png"
        parts.append(comparison_markdown(comp, rows, skipped, plot))
    if failures:
        parts.append("## Failed runs\n\n" + "\n".join(f"- {f}" for f in failures) + "\n")
    text = "\n".join(parts)
    from kdjax.train import files

    files.write_text(workdir / "study.md", text)
    return text


def study(config, workdir) -> str:
    """Resolve, run and report a study; returns study.md's text."""
    workdir = pathlib.Path(workdir).resolve()  # one spelling: runs store teacher paths
    teacher, runs = build_runs(config, workdir)
    share_identical(runs)
    for run in runs:
        if run.skipped:
            log.warning("[study] skipping %s: %s", run.label, run.skipped)
    workdir.mkdir(parents=True, exist_ok=True)

    def progress(table, failures):
        write_report(config, teacher, runs, table, failures, workdir, plots=False)

    workers = int(config.get("workers", 1))
    if workers < 1:
        raise ValueError(f"study.workers must be ≥ 1, got {workers}")
    table, failures = run_all(teacher, runs, on_result=progress, workers=workers)
    return write_report(config, teacher, runs, table, failures, workdir)


def main(argv) -> int:
    """``python -m kdjax.study``: the flags are kdjax.main's --config and --workdir."""
    from absl import app
    from kdjax import main as kdjax_main
    from kdjax.data import MissingDatasetError
    from kdjax.train.loop import Preempted

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = kdjax_main._CONFIG.value, kdjax_main._WORKDIR.value
    if config is None or workdir is None:
        raise app.UsageError("both --config=configs/study.py[:quick] and --workdir=DIR are required")
    kdjax_main.configure_logging()
    try:
        study(config, workdir)
    except (ValueError, FileNotFoundError, MissingDatasetError) as err:
        print(f"kdjax.study: error: {err}", file=sys.stderr)
        return kdjax_main.EXIT_CONFIG
    except Preempted as err:
        print(f"kdjax.study: {err}; rerun the same command to continue", file=sys.stderr)
        return kdjax_main.EXIT_PREEMPTED
    print(f"kdjax.study: wrote {pathlib.Path(workdir) / 'study.md'}")
    return 0


if __name__ == "__main__":
    from absl import app

    import kdjax.main  # noqa: F401  (defines the --config and --workdir flags)

    app.run(main)
