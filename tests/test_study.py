"""kdjax.study: statistics against NumPy / closed forms, grid resolution, and the runner on
synthetic data (2 seeds, resume after an interruption, study.md and plots)."""

import functools
import json
import math
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from kdjax import study


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------

def test_mean_std_matches_numpy():
    x = [87.9, 87.77, 87.32, 88.41]
    mean, std = study.mean_std(x)
    assert mean == pytest.approx(np.mean(x), abs=1e-12)
    assert std == pytest.approx(np.std(x, ddof=1), abs=1e-12)


def test_mean_std_of_one_value_has_no_spread():
    mean, std = study.mean_std([3.5])
    assert mean == 3.5 and math.isnan(std)
    with pytest.raises(ValueError):
        study.mean_std([])


def test_paired_differences_use_common_seeds_in_order():
    variant = {2: 10.0, 0: 12.0, 1: 11.5, 5: 9.0}
    baseline = {0: 11.0, 1: 11.0, 2: 10.5}
    assert study.paired_differences(variant, baseline) == pytest.approx([1.0, 0.5, -0.5])


def test_t_quantile_closed_forms():
    # Student's t with 1 df is Cauchy: t_p = tan(π(p − 1/2)); with 2 df:
    # t_p = (2p − 1) / sqrt(2 p (1 − p)).
    p = 0.975
    assert study.t_quantile_975(1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-3)
    assert study.t_quantile_975(2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)),
                                                    abs=1e-3)
    with pytest.raises(ValueError):
        study.t_quantile_975(0)


def test_t_quantile_table_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert study.t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=6e-4)
    assert study.t_quantile_975(100) >= scipy_stats.t.ppf(0.975, 100)  # conservative beyond 30


def test_t_interval_matches_numpy():
    d = np.array([0.8, 0.35, 1.1, 0.6])
    t = study.t_interval(list(d))
    se = d.std(ddof=1) / math.sqrt(len(d))
    half = 3.182 * se  # t_{0.975, 3} from a printed table
    assert t["n"] == 4
    assert t["mean"] == pytest.approx(d.mean())
    assert t["se"] == pytest.approx(se)
    assert (t["low"], t["high"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-3)
    one = study.t_interval([0.4])
    assert one["mean"] == 0.4 and math.isnan(one["low"])


# ---------------------------------------------------------------------------------------
# Grid resolution
# ---------------------------------------------------------------------------------------

def test_apply_overrides_sets_nested_keys_and_names_unknown_ones():
    config = ml_collections.ConfigDict(dict(a=1, b=dict(c=2.0, d="x")))
    config.lock()
    study.apply_overrides(config, (("a", 3), ("b.c", 5)), "here")
    assert config.a == 3 and config.b.c == 5.0
    with pytest.raises(ValueError, match=r"here: override b\.e=1: no key 'e' under b; "
                                         r"valid: \['c', 'd'\]"):
        study.apply_overrides(config, (("b.e", 1),), "here")
    with pytest.raises(ValueError, match="here: override b.d=3"):
        study.apply_overrides(config, (("b.d", 3),), "here")  # wrong type


def test_lookup_paths_with_list_indices():
    results = {"kd": {"test_top1_last": 88.1}, "levels": [{"macs": 1.0}, {"macs": 2.0}]}
    assert study.lookup(results, "kd.test_top1_last") == 88.1
    assert study.lookup(results, "levels.-1.macs") == 2.0
    with pytest.raises(KeyError, match="no 'student'.*available: \\['kd', 'levels'\\]"):
        study.lookup(results, "student.test_top1_last")


def synthetic_overrides():
    """Every run a 1-step smoke run on tiny synthetic images."""
    return (("data.name", "synthetic"), ("data.source", "synthetic"),
            ("data.augment", "none"), ("data.mean", (0.5, 0.5, 0.5)),
            ("data.std", (0.5, 0.5, 0.5)), ("data.validation_size", 64),
            ("data.synthetic_train", 128), ("data.synthetic_test", 64),
            ("data.synthetic_shape", (8, 8, 3)), ("train.max_steps", 1),
            ("train.eval_batch_size", 64), ("train.log_every_steps", 1))


def tiny_study(variants, seeds=(0, 1)):
    """A one-comparison study on synthetic data (resnet8 teacher and student)."""
    config = ml_collections.ConfigDict()
    config.description = "test study"
    config.seeds = seeds
    config.overrides = synthetic_overrides()
    config.teacher = ml_collections.ConfigDict(dict(
        config="configs/supervised.py:demo", seed=0, stage="model",
        overrides=(("model.name", "resnet8"), ("optim.batch_size", 16))))
    budget = (("optim.batch_size", 16), ("student.name", "resnet8"), ("teacher.name", "resnet8"))
    config.comparisons = (ml_collections.ConfigDict(dict(
        name="cmp", kind="distill", baseline=variants[0].name, description="two variants",
        overrides=budget, variants=tuple(variants))),)
    return config


def var(name, overrides, stage, config="configs/kd.py:demo", requires=()):
    from configs.study import variant  # the study config's own constructor

    return variant(name, config, overrides, stage=stage, requires=requires)


def test_unknown_override_fails_before_any_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "execute", lambda run: calls.append(run))
    config = tiny_study([var("a", (("kd.baseline", True),), "student"),
                         var("b", (("kd.no_such_key", 1),), "kd")])
    with pytest.raises(ValueError, match="cmp/b.overrides: override kd.no_such_key"):
        study.study(config, tmp_path)
    assert calls == []


def test_bad_baseline_fails_at_start(tmp_path):
    config = tiny_study([var("a", (), "kd")])
    config.comparisons[0].baseline = "nope"
    with pytest.raises(ValueError, match="baseline 'nope' is not one of its variants"):
        study.build_runs(config, tmp_path)


def test_teacher_of_another_model_fails_at_start(tmp_path):
    config = tiny_study([var("a", (("kd.baseline", True), ("teacher.name", "resnet14")),
                             "student")])
    with pytest.raises(ValueError, match="cmp/a: teacher.name='resnet14' but the study's "
                                         "shared teacher is a 'resnet8'"):
        study.build_runs(config, tmp_path)


def test_missing_config_and_missing_key_are_skipped_with_reason(tmp_path):
    config = tiny_study([var("a", (("kd.baseline", True),), "student"),
                         var("b", (), "x", config="configs/not_here.py:demo"),
                         var("c", (), "x", requires=("no_section",))])
    _, runs = study.build_runs(config, tmp_path)
    reasons = {r.variant: r.skipped for r in runs if r.seed == 0}
    assert reasons["a"] == ""
    assert reasons["b"] == "configs/not_here.py is not on this branch"
    assert reasons["c"] == "configs/kd.py:demo has no key no_section (not on this branch)"


def test_unknown_distill_method_fails_at_start(tmp_path):
    pytest.importorskip("kdjax.distill")
    config = tiny_study([var("a", (("kd.baseline", True),), "student"),
                         var("b", (("distill.method", "nope"),), "nope")])
    with pytest.raises(ValueError, match="cmp/b: unknown distill.method 'nope'; valid: "):
        study.build_runs(config, tmp_path)


def test_identical_configs_share_one_run(tmp_path):
    config = tiny_study([var("student", (("kd.baseline", True),), "student"),
                         var("kd", (("kd.baseline", True),), "kd")])
    _, runs = study.build_runs(config, tmp_path)
    study.share_identical(runs)
    for seed in (0, 1):
        dirs = {r.dir for r in runs if r.seed == seed}
        assert dirs == {tmp_path / "cmp" / "student" / f"seed{seed}"}


def test_every_shipped_preset_resolves(tmp_path):
    from configs import study as study_config

    for preset in ("", "quick"):
        config = study_config.get_config(preset)
        teacher, runs = study.build_runs(config, tmp_path)
        assert teacher.config.data.train_size == study_config.TRAIN_SIZE
        ran = [r for r in runs if not r.skipped]
        assert ran and all(r.config.data.train_size == study_config.TRAIN_SIZE for r in ran)
        assert {r.seed for r in runs} == {0, 1, 2}
        shared = str(tmp_path / "teacher" / config.teacher.stage)
        for run in (r for r in ran if r.comparison == "cross_layer"):
            assert run.config.teachers == (shared, "resnet14@1")
            assert run.config.optim.epochs == study_config.STUDENT_EPOCHS
        if preset == "":
            # the equal-MACs PDD comparison reuses PDD's runs and moves only the baselines
            study.share_identical(ran)
            cell = {(r.comparison, r.variant, r.seed): r for r in ran}
            for seed in (0, 1, 2):
                assert cell["pdd_equal_macs", "pdd", seed].dir == cell["pdd", "pdd", seed].dir
                for method in ("l1", "taylor"):
                    moved = cell["pdd_equal_macs", method, seed]
                    assert moved.dir != cell["pdd", method, seed].dir
                    assert moved.config.target_flops_ratio == study_config.PDD_PROTOCOL_RATIO
                # the ablation: PDD's own run as baseline, one switch flipped in the other
                ablation = cell["pdd_ablations", "finetune_kd", seed].config
                assert cell["pdd_ablations", "pdd", seed].dir == cell["pdd", "pdd", seed].dir
                assert ablation.pdd.finetune_kd and not ablation.pdd.kd_baseline
                assert not cell["pdd", "pdd", seed].config.pdd.finetune_kd


# ---------------------------------------------------------------------------------------
# The runner (synthetic data)
# ---------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


# Test accuracy each fake run reports, chosen here: {(lr, seed): top-1}.
FAKE_TOP1 = {(0.05, 0): 80.0, (0.05, 1): 81.5, (0.1, 0): 81.0, (0.1, 1): 83.5}


def fake_pipelines(monkeypatch, started, fail_on=None):
    """Replace the supervised and kd pipelines by instant fakes that record their workdir,
    report FAKE_TOP1 for (optim.lr, seed), and raise Interrupted when started in
    ``fail_on`` (a run killed half-way)."""
    from kdjax import main as kdjax_main

    def fake(config, workdir):
        started.append(workdir)
        if workdir == fail_on:
            raise Interrupted
        top1 = FAKE_TOP1.get((config.optim.lr, config.seed), 90.0)
        return {"kd": {"test_top1_last": top1, "test_top1_best_epoch": top1 + 1},
                "model": {"test_top1_last": 90.0, "test_top1_best_epoch": 90.0}}

    for name in ("supervised", "kd"):
        monkeypatch.setitem(kdjax_main.PIPELINES, name, fake)


def lr_study():
    return tiny_study([var("student", (("kd.baseline", False), ("optim.lr", 0.05)), "kd"),
                       var("kd", (("kd.baseline", False), ("optim.lr", 0.1)), "kd")])


def test_runner_resumes_and_reports(tmp_path, monkeypatch):
    started = []
    # First attempt: killed while the second grid run (seed 0, "kd") is running.
    fake_pipelines(monkeypatch, started, fail_on=str(tmp_path / "cmp/kd/seed0"))
    with pytest.raises(Interrupted):
        study.study(lr_study(), tmp_path)
    assert started == [str(tmp_path / v) for v in ("teacher", "cmp/student/seed0",
                                                   "cmp/kd/seed0")]
    # Rerun: the teacher and the finished run are skipped; the killed one starts again.
    started.clear()
    fake_pipelines(monkeypatch, started)
    text = study.study(lr_study(), tmp_path)
    assert started == [str(tmp_path / f"cmp/{v}/seed{s}")
                       for s, v in ((0, "kd"), (1, "student"), (1, "kd"))]
    assert text == (tmp_path / "study.md").read_text()

    student = [FAKE_TOP1[(0.05, s)] for s in (0, 1)]
    diffs = np.subtract([FAKE_TOP1[(0.1, s)] for s in (0, 1)], student)  # [1.0, 2.0]
    half = 12.706 * diffs.std(ddof=1) / math.sqrt(2)  # t_{0.975, 1} from a printed table
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ")}
    assert rows["student"].startswith(
        f"| student | 2 | {np.mean(student):.2f} ± {np.std(student, ddof=1):.2f} | "
        f"{np.mean(student) + 1:.2f} ± {np.std(student, ddof=1):.2f} | baseline | baseline |")
    ci = f"{diffs.mean():+.2f} [{diffs.mean() - half:+.2f}, {diffs.mean() + half:+.2f}]"
    assert f"| {ci} | {ci} |" in rows["kd"]
    assert rows["kd"].endswith("| 81.00, 83.50 | — |")  # the fakes log no train records
    assert "teacher (configs/supervised.py:demo, seed 0, shared by every run): test top-1 90.00" \
        in text
    assert "## cmp" in text and "![cmp](cmp.png)" in text
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_run_is_reported_and_the_study_goes_on(tmp_path, monkeypatch):
    started = []
    fake_pipelines(monkeypatch, started)
    config = tiny_study([var("student", (("kd.baseline", False), ("optim.lr", 0.05)), "kd"),
                         var("kd", (("kd.baseline", False), ("optim.lr", 0.1)), "nope")])
    text = study.study(config, tmp_path)
    assert len(started) == 5
    assert "## Failed runs" in text
    assert "cmp/kd/seed1: \"result path 'nope.test_top1_last': no 'nope'" in text


def test_train_images_per_second_is_the_median_interval_rate(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 50, "split": "train", "time": 100.0},
               {"step": 100, "split": "train", "time": 102.0},     # 64·50/2 = 1600 img/s
               {"step": 100, "split": "test", "time": 110.0},      # ignored
               {"step": 150, "split": "train", "time": 112.0},     # 320 (holds the eval)
               {"step": 200, "split": "train", "time": 116.0}]     # 800
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert study.train_images_per_second(path, 64) == pytest.approx(800.0)
    path.write_text(json.dumps(records[0]) + "\n")
    assert study.train_images_per_second(path, 64) is None
    assert study.train_images_per_second(tmp_path / "absent.jsonl", 64) is None


def test_a_finished_run_with_another_config_is_not_reused(tmp_path, monkeypatch):
    started = []
    fake_pipelines(monkeypatch, started)
    study.study(lr_study(), tmp_path)
    changed = lr_study()
    changed.comparisons[0].overrides += (("optim.weight_decay", 1e-3),)
    text = study.study(changed, tmp_path)
    assert "## Failed runs" in text
    assert "cmp/kd/seed0: the finished run in" in text and "optim.weight_decay" in text
    assert len(started) == 5  # nothing was run again


def test_a_relative_and_an_absolute_workdir_are_the_same_study(tmp_path, monkeypatch):
    """Runs store the teacher's path: resuming ``study`` as ``$PWD/study`` reuses them."""
    started = []
    fake_pipelines(monkeypatch, started)
    monkeypatch.chdir(tmp_path)
    study.study(lr_study(), "study")
    text = study.study(lr_study(), tmp_path / "study")
    assert "Failed runs" not in text and len(started) == 5


def two_comparison_study(only):
    """lr_study with a second comparison "other" (a copy with another budget)."""
    config = lr_study()
    other = ml_collections.ConfigDict(config.comparisons[0].to_dict())
    other.name = "other"
    other.overrides = tuple(other.overrides) + (("optim.epochs", 3),)  # not shared with cmp
    config.comparisons = (config.comparisons[0], other)
    config.only = only
    return config


def test_only_trains_the_named_comparisons_and_reports_the_finished_rest(tmp_path,
                                                                         monkeypatch):
    started = []
    fake_pipelines(monkeypatch, started)
    text = study.study(two_comparison_study(("other",)), tmp_path)
    assert started == [str(tmp_path / "teacher")] + [
        str(tmp_path / f"other/{v}/seed{s}") for s in (0, 1) for v in ("student", "kd")]
    rows = [line for line in text.splitlines() if line.startswith("| kd |")]
    assert rows[0].startswith("| kd | 0 |") and rows[1].startswith("| kd | 2 |")
    # Now train "cmp": "other" is not trained again but still reported.
    started.clear()
    text = study.study(two_comparison_study(("cmp",)), tmp_path)
    assert started == [str(tmp_path / f"cmp/{v}/seed{s}") for s in (0, 1)
                       for v in ("student", "kd")]
    assert [line[:10] for line in text.splitlines() if line.startswith("| kd |")] == \
        ["| kd | 2 |"] * 2
    with pytest.raises(ValueError, match=r"unknown comparisons \['nope'\]; valid: \['cmp', "):
        study.build_runs(two_comparison_study(("nope",)), tmp_path)


@pytest.mark.slow
def test_runner_end_to_end_on_synthetic_data(tmp_path):
    """The real pipelines (1-step runs): teacher once, then 2 seeds × 2 variants."""
    text = study.study(lr_study(), tmp_path)
    for s in (0, 1):
        for v in ("student", "kd"):
            stored = json.loads((tmp_path / f"cmp/{v}/seed{s}/study_result.json").read_text())
            assert stored["results"]["kd"]["steps"] == 1
            assert stored["results"]["teacher"]["checkpoint"] == str(tmp_path / "teacher/model")
    assert "| kd | 2 |" in text


def marking_pipelines(monkeypatch, die_in=None, preempt_in=None):
    """Fakes like ``fake_pipelines`` for child processes (forked: they inherit the patch):
    each start leaves a file ``started-<pid>`` in its workdir; ``die_in`` exits the
    process with code 9 without a result, ``preempt_in`` raises Preempted."""
    from kdjax import main as kdjax_main
    from kdjax.train.loop import Preempted

    def fake(config, workdir):
        (pathlib.Path(workdir) / f"started-{os.getpid()}").write_text("")
        if workdir == die_in:
            os._exit(9)
        if workdir == preempt_in:
            raise Preempted("SIGTERM")
        top1 = FAKE_TOP1.get((config.optim.lr, config.seed), 90.0)
        return {"kd": {"test_top1_last": top1, "test_top1_best_epoch": top1 + 1},
                "model": {"test_top1_last": 90.0, "test_top1_best_epoch": 90.0}}

    for name in ("supervised", "kd"):
        monkeypatch.setitem(kdjax_main.PIPELINES, name, fake)


def shared_lr_study(workers):
    """lr_study plus a variant identical to "kd" (shares its runs), ``workers`` at once."""
    config = lr_study()
    same = var("kd_again", (("kd.baseline", False), ("optim.lr", 0.1)), "kd")
    config.comparisons[0].variants = tuple(config.comparisons[0].variants) + (same,)
    config.workers = workers
    return config


def started_pids(workdir):
    return sorted(p.name for p in pathlib.Path(workdir).glob("started-*"))


@pytest.mark.filterwarnings("ignore:os.fork")  # the children never call JAX
def test_parallel_workers_report_what_one_process_reports(tmp_path, monkeypatch):
    """workers=2 (forked children): the same study.md as workers=1, every directory
    trained once and in a process other than this one."""
    marking_pipelines(monkeypatch)
    sequential = study.study(shared_lr_study(1), tmp_path / "one")
    monkeypatch.setattr(study, "run_all", functools.partial(study.run_all,
                                                            start_method="fork"))
    parallel = study.study(shared_lr_study(2), tmp_path / "two")
    assert parallel.replace("/two", "/one") == sequential
    cells = [tmp_path / "two" / f"cmp/{v}/seed{s}" for s in (0, 1) for v in ("student", "kd")]
    assert not (tmp_path / "two/cmp/kd_again").exists()  # shares kd's runs
    for cell in cells:
        pids = started_pids(cell)
        assert len(pids) == 1 and pids[0] != f"started-{os.getpid()}"
    assert started_pids(tmp_path / "two/teacher") == [f"started-{os.getpid()}"]


@pytest.mark.filterwarnings("ignore:os.fork")  # the children never call JAX
def test_parallel_worker_death_fails_its_cell_and_preemption_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_all", functools.partial(study.run_all,
                                                            start_method="fork"))
    marking_pipelines(monkeypatch, die_in=str(tmp_path / "cmp/kd/seed0"))
    text = study.study(shared_lr_study(2), tmp_path)
    assert "cmp/kd/seed0: the run's process exited with code 9 without a result" in text
    assert "cmp/kd_again/seed0: the run's process exited with code 9" in text
    assert "| student | 2 |" in text  # the other cells finished
    marking_pipelines(monkeypatch, preempt_in=str(tmp_path / "cmp/kd/seed0"))
    from kdjax.train.loop import Preempted

    with pytest.raises(Preempted):
        study.study(shared_lr_study(2), tmp_path)
    with pytest.raises(ValueError, match="workers must be ≥ 1"):
        study.study(shared_lr_study(0), tmp_path)


@pytest.mark.filterwarnings("ignore:os.fork")  # the children never call JAX
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # fork+logging
def test_sigterm_to_the_study_reaches_its_running_children(tmp_path, monkeypatch):
    """A child signals its parent (as a scheduler would) and then sleeps: the parent
    passes SIGTERM on (the sleeping child dies at once), starts nothing new and raises
    Preempted — without waiting for the sleep."""
    import signal
    import time

    from kdjax import main as kdjax_main
    from kdjax.train.loop import Preempted

    def fake(config, workdir):
        (pathlib.Path(workdir) / "started").write_text("")
        if workdir.endswith("cmp/student/seed0"):
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(60)
        return {"kd": {"test_top1_last": 80.0, "test_top1_best_epoch": 80.0},
                "model": {"test_top1_last": 90.0, "test_top1_best_epoch": 90.0}}

    for name in ("supervised", "kd"):
        monkeypatch.setitem(kdjax_main.PIPELINES, name, fake)
    monkeypatch.setattr(study, "run_all", functools.partial(study.run_all,
                                                            start_method="fork"))
    start = time.monotonic()
    with pytest.raises(Preempted):
        study.study(shared_lr_study(2), tmp_path)
    assert time.monotonic() - start < 30
    assert not (tmp_path / "cmp/student/seed1/started").exists()  # nothing new started
    assert not (tmp_path / "cmp/student/seed0" / study.RESULT_FILE).exists()


@pytest.mark.slow
def test_parallel_workers_with_real_pipelines(tmp_path):
    """workers=2 with spawned children running the real pipelines (1-step runs)."""
    config = lr_study()
    config.workers = 2
    text = study.study(config, tmp_path)
    for s in (0, 1):
        for v in ("student", "kd"):
            stored = json.loads((tmp_path / f"cmp/{v}/seed{s}/study_result.json").read_text())
            assert stored["results"]["kd"]["steps"] == 1
    assert "| kd | 2 |" in text and "Failed runs" not in text


def test_a_run_held_by_another_process_fails_its_cell_only(tmp_path, monkeypatch):
    """Two studies on one workdir: a cell whose directory another process holds (its
    workdir lock) is not run twice — it fails with the lock's message, the rest goes on."""
    import subprocess
    import sys

    started = []
    fake_pipelines(monkeypatch, started)
    held = tmp_path / "cmp/kd/seed0"
    held.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from kdjax.train.checkpoint import WorkdirLock\n"
        f"with WorkdirLock({str(held)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        text = study.study(lr_study(), tmp_path)
    finally:
        holder.kill()
    assert str(held) not in started and len(started) == 4
    assert "cmp/kd/seed0: workdir" in text and "in use by another kdjax run" in text


def test_runs_another_study_finishes_meanwhile_are_reported(tmp_path, monkeypatch):
    """Two studies on one workdir with different ``only``: the cells the other one finishes
    while this one trains appear in this one's study.md, not as empty rows."""
    started = []
    fake_pipelines(monkeypatch, started)
    _, other_study_cells = study.build_runs(two_comparison_study(("cmp",)), tmp_path)
    other_study_cells = [r for r in other_study_cells if r.comparison == "cmp"]
    execute = study.execute

    def execute_while_the_other_study_finishes_cmp(run):
        if run.comparison == "other":  # this study's work was listed before this point
            while other_study_cells:
                execute(other_study_cells.pop())
        return execute(run)

    monkeypatch.setattr(study, "execute", execute_while_the_other_study_finishes_cmp)
    text = study.study(two_comparison_study(("other",)), tmp_path)
    assert len(started) == 9  # teacher, 4 cells of "other", 4 of "cmp" by the other study
    assert [line[:10] for line in text.splitlines() if line.startswith("| kd |")] == \
        ["| kd | 2 |"] * 2
    assert (tmp_path / "study.md").read_text() == text
