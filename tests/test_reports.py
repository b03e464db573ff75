"""kdjax.reports: markdown tables (content written out by hand) and PNGs (written, PNG)."""

import types

import numpy as np
import pytest

from kdjax import reports

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_stage_table():
    table = reports.stage_table({
        "teacher": {"model": "resnet56", "test_top1_last": 93.456, "test_top1_best_epoch": 93.5},
        "kd": {"model": "resnet20", "test_top1_last": 91.0}})
    assert table.splitlines() == [
        "| stage | model | test top-1 last | test top-1 best epoch |", "|---|---|---|---|",
        "| teacher | resnet56 | 93.46 | 93.50 |", "| kd | resnet20 | 91.00 | — |"]


def test_widths_and_pdd_markdown():
    groups, kept = {"stem": 16, "stage1": 32}, {"stem": 4, "stage1": 32}
    assert reports.widths_table(groups, kept).splitlines()[2:] == [
        "| stem | 16 | 4 | 25.0 |", "| stage1 | 32 | 32 | 100.0 |"]
    summary = {
        "student": "resnet20_pdd", "pruned_test_top1": 90.5, "unpruned_kd_test_top1": 91.25,
        "unpruned_cost": {"macs": 41_000_000, "params": 270_000},
        "pruned_cost": {"macs": 20_500_000, "params": 135_000},
        "before_finetune": {"validation": None, "test": {"top1": 80.0}},
        "reduction_vs_unpruned_student": {"macs_removed_pct": 50.0, "params_removed_pct": 50.0}}
    lines = reports.pdd_markdown(summary, groups, kept).splitlines()
    assert lines[0] == "## PDD: resnet20_pdd"
    assert "| unpruned student + KD | 91.25 | 41.00M | 270,000 |" in lines
    assert "| pruned (PDD) | 90.50 | 20.50M | 135,000 |" in lines
    assert "Compacted net before stage 2: test top-1 80.00." in lines
    assert ("MACs removed 50.00 %, params removed 50.00 % (vs the unpruned student)."
            in lines)
    assert "| stem | 16 | 4 | 25.0 |" in lines
    assert not any(l.startswith("Against the standard") for l in lines)


def cascade_summary(finetune=True):
    summary = {"model": "resnet56", "method": "cascade", "num_tas": 1,
               "target_flops_ratio": 0.3, "levels": [
                   {"level": 0, "role": "teacher", "target_macs_ratio": 1.0,
                    "macs_ratio": 1.0, "macs": 125_000_000, "params": 850_000,
                    "test_top1": 93.0},
                   {"level": 1, "role": "TA1", "target_macs_ratio": 0.55,
                    "macs_ratio": 0.5478, "macs": 68_400_000, "params": 500_000,
                    "test_top1": None},
                   {"level": 2, "role": "student", "target_macs_ratio": 0.3,
                    "macs_ratio": 0.29, "macs": 36_250_000, "params": 250_000,
                    "test_top1": 90.0}]}
    if finetune:
        summary["finetune"] = {"test_top1_last": 91.5}
    return summary


def test_cascade_markdown():
    lines = reports.cascade_markdown(cascade_summary()).splitlines()
    assert lines[0] == ("## Cascaded pruning: resnet56, method cascade, 1 TA(s), "
                        "target MACs ratio 0.3")
    assert lines[4:7] == [
        "| 0 | teacher | 1.0000 | 1.0000 | 125.00M | 850,000 | 93.00 |",
        "| 1 | TA1 | 0.5500 | 0.5478 | 68.40M | 500,000 | — |",
        "| 2 | student | 0.3000 | 0.2900 | 36.25M | 250,000 | 90.00 |"]
    assert lines[-1] == "Student after KD fine-tuning: test top-1 91.50."


@pytest.mark.parametrize("band", [True, False])
def test_controller_plot(tmp_path, band):
    rows = [{"step": s, "controller": 1.0 + 0.1 * s, "H_q": 2.0, "H_p": 1.5, "kd": 0.3,
             "ce": 1.2, **({"controller_min": 0.9, "controller_max": 1.4} if band else {})}
            for s in range(5)]
    reports.controller_plot(rows, tmp_path / "c.png")
    assert_png(tmp_path / "c.png")


@pytest.mark.parametrize("finetune", [True, False])
def test_accuracy_macs_plot(tmp_path, finetune):
    reports.accuracy_macs_plot(tmp_path / "a.png", cascade_summary(finetune))
    assert_png(tmp_path / "a.png")


def test_pareto_and_hypervolume_plots(tmp_path):
    rng = np.random.default_rng(0)
    search = {"evaluated": rng.random((20, 2)), "population": rng.random((6, 2)),
              "objectives": rng.random((4, 2)), "candidates": np.array([0, 3]),
              "hypervolume": [0.1, 0.2, 0.25]}
    reports.pareto_plot(tmp_path / "p.png", "s1", search)
    reports.hypervolume_plot(tmp_path / "h.png", {"s1": search, "s2": search})
    assert_png(tmp_path / "p.png")
    assert_png(tmp_path / "h.png")


@pytest.mark.parametrize("kind", ["distill", "pruning"])
def test_comparison_plot(tmp_path, kind):
    comp = types.SimpleNamespace(name="c", kind=kind, baseline="a")
    rows = [{"name": "a", "top1": {0: 90.0, 1: 91.0}, "macs": [40e6]},
            {"name": "b", "top1": {0: 92.0}, "macs": [20e6]}]
    reports.comparison_plot(tmp_path / "s.png", comp, rows, [(90.5, 0.7), (92.0, float("nan"))])
    assert_png(tmp_path / "s.png")


def test_comparison_table():
    results = {"teacher": {"model": "resnet20", "test_top1_last": 90.0},
               "student": {"test_top1_last": 85.5}, "kd": {"test_top1_last": 86.75}}
    lines = reports.comparison_table(results, "resnet8", "kd", 0.3).splitlines()
    assert lines[2:] == [
        "| teacher resnet20 | 90.00 |", "| student resnet8 alone | 85.50 |",
        "| student resnet8 + kd | 86.75 |", "| kd − student | +1.25 |",
        "| seed-to-seed std of KD − student, this protocol (3 seeds, BUILD_NOTES) | 0.30 |"]
    loaded = {**results, "teacher": {"model": "resnet20", "step": 7}}
    lines = reports.comparison_table(loaded, "resnet8", "kd", 0.0).splitlines()
    assert lines[2] == "| teacher resnet20 | loaded (step 7) |" and len(lines) == 6


def test_latency_plot(tmp_path):
    rows = [{"macs": 40e6, "seconds": 0.010, "round_to": 1},
            {"macs": 20e6, "seconds": 0.007, "round_to": 1},
            {"macs": 21e6, "seconds": 0.006, "round_to": 8}]
    reports.latency_plot(rows, "resnet56", tmp_path / "l.png")
    assert_png(tmp_path / "l.png")
