"""Summary tables and plots of every pipeline: markdown strings and PNG files.

Tables are pure functions of the pipelines' result dicts and return markdown. Plots write
one PNG to the path given (the caller chooses the path, and on several hosts calls them on
the writing process only); matplotlib is imported here only, lazily, with the Agg backend,
so nothing else in kdjax loads it.

  stage_table       test top-1 per trained stage (kd, dynamic_kd, cross_layer)
  comparison_table  teacher, student alone, distilled student, difference (kd's demo)
  widths_table      kept channels per mask group (pdd)
  pdd_markdown      PDD summary: accuracy, cost, reductions, widths
  cascade_markdown  one row per level of a cascade (cascaded)
  controller_plot   DynamicKD's controller, entropies and loss terms against the step
  accuracy_macs_plot  test top-1 against MACs per level (cascaded)
  pareto_plot       evaluated candidates, final population, archived front (emo_pms)
  hypervolume_plot  NSGA-II hypervolume per generation (emo_pms)
  comparison_plot   one comparison of a study: top-1 bars or top-1 against MACs (study)
  latency_plot      pruned latency against MACs (bench_speed)
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

PathLike = str | pathlib.Path


def _pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: PathLike, dpi: int = 100) -> None:
    """Lay out, write through kdjax.train.files (process 0 only, any epath), close."""
    from kdjax.train import files

    fig.tight_layout()
    files.save_figure(fig, path, dpi=dpi)
    _pyplot().close(fig)


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------


def stage_table(results: dict) -> str:
    """Markdown table of test top-1 (last and best epoch) for each trained stage
    {stage: {'model', 'test_top1_last', 'test_top1_best_epoch'}} ("—" when missing)."""
    rows = ["| stage | model | test top-1 last | test top-1 best epoch |", "|---|---|---|---|"]
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for stage, r in results.items():
        last = r.get("test_top1_last")
        best = r.get("test_top1_best_epoch")
        rows.append(f"| {stage} | {r.get('model', '')} | {fmt(last)} | {fmt(best)} |")
    return "\n".join(rows)


def comparison_table(results: dict, student: str, method: str, seed_noise: float) -> str:
    """The demo's one table: teacher, student alone, distilled student (test top-1, last
    epoch), their difference and — when ``seed_noise`` > 0 — the measured seed-to-seed
    std of that difference, so one run's difference can be read against it."""
    top1 = {stage: r.get("test_top1_last") for stage, r in results.items()}
    teacher = results["teacher"]
    rows = ["| | test top-1 (%) |", "|---|---|"]
    if top1.get("teacher") is not None:
        rows.append(f"| teacher {teacher.get('model', '')} | {top1['teacher']:.2f} |")
    else:
        rows.append(f"| teacher {teacher.get('model', '')} | loaded (step {teacher.get('step')}) |")
    rows.append(f"| student {student} alone | {top1['student']:.2f} |")
    rows.append(f"| student {student} + {method} | {top1[method]:.2f} |")
    rows.append(f"| {method} − student | {top1[method] - top1['student']:+.2f} |")
    if seed_noise > 0:
        rows.append(f"| seed-to-seed std of KD − student, this protocol (3 seeds, BUILD_NOTES) | "
                    f"{seed_noise:.2f} |")
    return "\n".join(rows)


def widths_table(groups: dict[str, int], kept: dict[str, int]) -> str:
    """Markdown table of kept channels per group: channels, kept, kept %."""
    rows = ["| group | channels | kept | kept % |", "|---|---|---|---|"]
    for g, c in groups.items():
        rows.append(f"| {g} | {c} | {kept[g]} | {100.0 * kept[g] / c:.1f} |")
    return "\n".join(rows)


def pdd_markdown(summary: dict, groups: dict[str, int], kept: dict[str, int]) -> str:
    """README-friendly PDD summary: accuracy, cost and reductions, widths table."""
    red = summary["reduction_vs_unpruned_student"]
    lines = [
        f"## PDD: {summary['student']}",
        "",
        "| model | test top-1 | MACs | params |",
        "|---|---|---|---|",
    ]
    if "unpruned_kd_test_top1" in summary:
        lines.append(f"| unpruned student + KD | {summary['unpruned_kd_test_top1']:.2f} | "
                     f"{summary['unpruned_cost']['macs'] / 1e6:.2f}M | "
                     f"{summary['unpruned_cost']['params']:,} |")
    lines.append(f"| pruned (PDD) | {summary['pruned_test_top1']:.2f} | "
                 f"{summary['pruned_cost']['macs'] / 1e6:.2f}M | "
                 f"{summary['pruned_cost']['params']:,} |")
    before = summary["before_finetune"]
    lines += ["", "Compacted net before stage 2: " + ", ".join(
        f"{split} top-1 {r['top1']:.2f}" for split, r in before.items() if r) + "."]
    lines += ["", f"MACs removed {red['macs_removed_pct']:.2f} %, params removed "
              f"{red['params_removed_pct']:.2f} % (vs the unpruned student)."]
    if "reduction_vs_standard_resnet20" in summary:
        std = summary["reduction_vs_standard_resnet20"]
        lines.append(f"Against the standard ResNet20: MACs removed {std['macs_removed_pct']:.2f} %, "
                     f"params removed {std['params_removed_pct']:.2f} %.")
    lines += ["", widths_table(groups, kept), ""]
    return "\n".join(lines)


def cascade_markdown(summary: dict) -> str:
    """A row per level of a cascade: MACs (target and reached), params, test top-1."""
    lines = [f"## Cascaded pruning: {summary['model']}, method {summary['method']}, "
             f"{summary['num_tas']} TA(s), target MACs ratio {summary['target_flops_ratio']}",
             "", "| level | role | target MACs ratio | MACs ratio | MACs | params | test top-1 |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["levels"]:
        top1 = "—" if r["test_top1"] is None else f"{r['test_top1']:.2f}"
        lines.append(f"| {r['level']} | {r['role']} | {r['target_macs_ratio']:.4f} | "
                     f"{r['macs_ratio']:.4f} | {r['macs'] / 1e6:.2f}M | {r['params']:,} | {top1} |")
    if "finetune" in summary:
        lines += ["", f"Student after KD fine-tuning: test top-1 "
                  f"{summary['finetune']['test_top1_last']:.2f}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------


def controller_plot(rows: list[dict], png: PathLike) -> None:
    """Three panels against the step: c (per class: mean, min–max band);
    H(q_c) and H(p_t); the KD and CE terms. rows: [{'step', 'controller', 'H_q', 'H_p',
    'kd', 'ce', optional 'controller_min'/'controller_max'}]."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    series = lambda key: [r[key] for r in rows]  # noqa: E731
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(steps, series("controller"), label="c (mean)")
    if "controller_min" in rows[0]:
        axes[0].fill_between(steps, series("controller_min"), series("controller_max"),
                             alpha=0.3, label="c min–max over classes")
    axes[0].set_ylabel("controller c")
    axes[0].legend()
    axes[1].plot(steps, series("H_q"), label="H(q_c) student")
    axes[1].plot(steps, series("H_p"), label="H(p_t) teacher")
    axes[1].set_ylabel("entropy (nats)")
    axes[1].legend()
    axes[2].plot(steps, series("kd"), label="KD term")
    axes[2].plot(steps, series("ce"), label="CE term")
    axes[2].set_ylabel("loss")
    axes[2].set_xlabel("step")
    axes[2].legend()
    _save(fig, png)


def accuracy_macs_plot(png: PathLike, summary: dict) -> None:
    """Test top-1 against MACs, one point per level of ``summary['levels']`` (and the
    fine-tuned student, when ``summary['finetune']``)."""
    plt = _pyplot()
    rows = [r for r in summary["levels"] if r["test_top1"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["macs"] / 1e6 for r in rows], [r["test_top1"] for r in rows], "o-")
    for r in rows:
        ax.annotate(r["role"], (r["macs"] / 1e6, r["test_top1"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    if "finetune" in summary:
        ax.plot([rows[-1]["macs"] / 1e6], [summary["finetune"]["test_top1_last"]], "r*",
                label="student, fine-tuned")
        ax.legend(fontsize=7)
    ax.set(xlabel="MACs per image (M)", ylabel="test top-1 (%)",
           title=f"{summary['model']}: {summary['method']}, {summary['num_tas']} TA(s)")
    _save(fig, png)


def pareto_plot(png: PathLike, name: str, search: dict) -> None:
    """Every evaluated candidate, the final population, the archived front (sorted by
    retained MACs ratio) and the chosen candidates of one NSGA-II search
    {'evaluated' [N, 2], 'population' [P, 2], 'objectives' [A, 2], 'candidates'}."""
    plt = _pyplot()
    obj, population = search["objectives"], search["population"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ev = search["evaluated"]
    ax.scatter(ev[:, 0], ev[:, 1], s=6, c="0.75", label="evaluated")
    ax.scatter(population[:, 0], population[:, 1], s=14, c="tab:blue",
               label="final population")
    order = np.argsort(obj[:, 0])
    ax.plot(obj[order, 0], obj[order, 1], "o-", c="tab:red", ms=5, label="archived front")
    cand = np.asarray(search.get("candidates", []), int)
    if len(cand):
        ax.scatter(obj[cand, 0], obj[cand, 1], marker="x", s=60, c="k", label="candidates")
    ax.set(xlabel="retained MACs ratio", ylabel="selector CE", title=f"Pareto front: {name}")
    ax.legend(fontsize=7)
    _save(fig, png)


def hypervolume_plot(png: PathLike, searches: dict) -> None:
    """Hypervolume per generation, one line per search {name: {'hypervolume': [...]}}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n, s in searches.items():
        ax.plot(range(len(s["hypervolume"])), s["hypervolume"], marker=".", label=n)
    ax.set(xlabel="generation", ylabel="hypervolume", title="NSGA-II hypervolume")
    ax.legend(fontsize=7)
    _save(fig, png)


def comparison_plot(png: PathLike, comp, rows: list[dict], stats: list[tuple]) -> None:
    """One comparison of a study (kdjax.study): bars of the mean test top-1 with ±std error
    bars (distill), or mean top-1 against mean MACs per variant on the same axes (pruning,
    when every variant has MACs). rows: [{'name', 'top1' {seed: %}, 'macs' [...]}];
    stats: [(mean, std)] per row (std NaN for one seed: no error bar)."""
    plt = _pyplot()
    errs = [0.0 if math.isnan(s) else s for _, s in stats]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.5))
    if comp.kind == "pruning" and all(r["macs"] for r in rows):
        for r, (m, _), e in zip(rows, stats, errs):
            ax.errorbar(sum(r["macs"]) / len(r["macs"]) / 1e6, m, yerr=e, fmt="o",
                        capsize=3, label=r["name"])
        ax.set_xlabel("MACs (M)")
        ax.legend(fontsize=8)
    else:
        ax.bar(range(len(rows)), [m for m, _ in stats], yerr=errs, capsize=3,
               color=["tab:gray" if r["name"] == comp.baseline else "tab:blue" for r in rows])
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=45, ha="right")
        low = min(m - e for (m, _), e in zip(stats, errs))
        high = max(m + e for (m, _), e in zip(stats, errs))
        ax.set_ylim(low - 0.5 - 0.2 * (high - low), high + 0.5)
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title(f"{comp.name} (mean ± std over seeds)")
    _save(fig, png)


def latency_plot(rows: list[dict], model_name: str, path: PathLike) -> None:
    """Latency (ms) against MACs (M), one line per round_to, the dense model (rows[0])
    marked (kdjax.bench_speed). rows: [{'macs', 'seconds', 'round_to'}]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for multiple in sorted({r["round_to"] for r in rows[1:]}):
        pts = sorted((r["macs"] / 1e6, 1e3 * r["seconds"]) for r in rows[1:]
                     if r["round_to"] == multiple)
        ax.plot(*zip(*pts), "o-", label="unrounded" if multiple == 1 else f"round_to {multiple}")
    ax.plot(rows[0]["macs"] / 1e6, 1e3 * rows[0]["seconds"], "k*", ms=12, label="dense")
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("eval latency per batch (ms)")
    ax.set_title(f"{model_name}: pruned latency vs MACs")
    ax.legend()
    _save(fig, path, dpi=120)
