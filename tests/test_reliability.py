"""Reliability: the eleven cases of BUILD_NOTES "Reliability", each a test that failed
before the fix. Bad input is one clear error with the README's exit code; no
non-finite or stale checkpoint is written; one run per workdir; a killed run resumes
bit-identically without repeated log lines.

Most cases run in-process through ``kdjax.main.run`` (the CLI minus flag parsing) on
tiny synthetic data; flag parsing, ``kill -9`` and a 1-device loader run as
subprocesses. ``KDJAX_TEST_KILL_AT`` is the kill hook of ``kdjax.train.checkpoint``.
"""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from kdjax import config_lib, data, main
from kdjax.pipelines import supervised
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import loop, metrics as metrics_lib, sharding

from test_cli import REPO, SYNTHETIC, kdjax_cli
from test_data import write_idx_folder
from test_train import final_params, load_config

SHAPE = "(16,16,3)"


def tiny(steps=4, pipeline="supervised", **train):
    """A seconds-long supervised (or kd) config: resnet8 on 16×16 synthetic images."""
    config = config_lib.synthetic(load_config(pipeline), steps=steps)
    config.data.synthetic_shape = (16, 16, 3)
    optim_cfg = config_lib.optim(epochs=3, batch_size=64, lr=0.05, milestones=(2,))
    if pipeline == "supervised":
        config.model.name, config.optim = "resnet8", optim_cfg
    else:
        config.teacher.name = config.student.name = "resnet8"
        config.optim = config.teacher.optim = optim_cfg
    config.train.update(train)
    return config


def run_main(config, workdir, capsys) -> tuple[int, str]:
    """``kdjax.main.run`` in-process: (exit code, the 'kdjax: error' lines of stderr)."""
    code = main.run(config, str(workdir))
    err = capsys.readouterr().err
    return code, "\n".join(line for line in err.splitlines() if line.startswith("kdjax: error"))


def train_lines(stage_dir) -> list[int]:
    return [r["step"] for r in metrics_lib.read_metrics(stage_dir / "metrics.jsonl")
            if r["split"] == "train"]


def steps_in(directory) -> list[int]:
    return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def assert_same_variables(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def kill_config():
    """The run of KILL_ARGS, in-process: ``configs/supervised.py:demo`` with the same
    overrides (resnet8, 16×16 synthetic images, no validation split so that every
    evaluation writes best/, checkpoints at steps 2, 4 and 5, a 2-device mesh)."""
    config = config_lib.synthetic(load_config("supervised"), steps=5)
    config.data.synthetic_shape, config.data.validation_size = (16, 16, 3), 0
    config.model.name = "resnet8"
    config.optim.batch_size, config.optim.epochs = 64, 3
    config.train.update(eval_every_steps=2, num_devices=2)
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """5 uninterrupted steps of ``kill_config`` (checkpoints/4 and /5 kept), shared: the
    run every killed-and-resumed run must reproduce bit for bit. Copy it to change it."""
    workdir = tmp_path_factory.mktemp("straight")
    supervised.run(kill_config(), workdir)
    return workdir


@pytest.fixture
def straight_copy(straight, tmp_path):
    shutil.copytree(straight, tmp_path / "w")
    return tmp_path / "w"


# 1. Non-finite state or evaluation ------------------------------------------------

def finite_evaluation(*args):
    return {"top1": 10.0, "top5": 50.0, "loss": 2.3}


def test_case1_non_finite_state_is_never_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "evaluate", finite_evaluation)  # only the state can stop it
    config = tiny(steps=4, eval_every_steps=1)
    config.optim.lr = 1e30  # the loss stays finite a step longer than the weights
    with pytest.raises(FloatingPointError, match=r"the state at step \d+ holds non-finite"):
        supervised.run(config, tmp_path)
    saved = steps_in(tmp_path / "model" / ckpt_lib.LAST_DIR)
    assert not saved or not loop.non_finite_arrays(final_params(tmp_path))
    assert not (tmp_path / "model" / "results.json").exists()


def test_case1_non_finite_evaluation_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "evaluate", lambda *a: {**finite_evaluation(), "loss": np.nan})
    with pytest.raises(FloatingPointError, match="test loss is nan at step 1"):
        supervised.run(tiny(steps=1), tmp_path)
    assert steps_in(tmp_path / "model" / ckpt_lib.LAST_DIR) == []
    assert not (tmp_path / "model" / "results.json").exists()


# 2. One run per workdir --------------------------------------------------------------

def test_case2_busy_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys, caplog):
    with ckpt_lib.WorkdirLock(tmp_path):
        code, err = run_main(tiny(), tmp_path, capsys)
    assert code == 1 and f"pid {os.getpid()}" in err and "in use" in err
    assert not (tmp_path / "model").exists()
    # A run killed while holding the lock leaves the file; the kernel freed the flock.
    (tmp_path / ckpt_lib.LOCK_FILE).write_text("pid 999999 on elsewhere, started long ago")
    with ckpt_lib.WorkdirLock(tmp_path):
        assert str(os.getpid()) in (tmp_path / ckpt_lib.LOCK_FILE).read_text()
    assert "pid 999999" in caplog.text
    assert (tmp_path / ckpt_lib.LOCK_FILE).read_text() == ""  # released


# 3. --workdir resolved or rejected at start-up ---------------------------------------

def test_case3_relative_workdir_is_made_absolute_and_empty_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main.resolve_workdir("runs/a") == tmp_path / "runs" / "a"
    assert (tmp_path / "runs" / "a").is_dir()
    code, err = run_main(tiny(), "", capsys)
    assert code == 2 and "--workdir is empty" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]  # nothing trained in the cwd


# 4. best/ never behind or ahead of the results ---------------------------------------

class SimulatedKill(BaseException):
    """Raised at a crash point: like kill -9, nothing after it runs (no except clause
    of kdjax catches a BaseException that is not an Exception)."""


def kill_at(monkeypatch, point, at_step):
    def crash(name, step=None):
        if name == point and step == at_step:
            raise SimulatedKill(point)

    monkeypatch.setattr(ckpt_lib, "crash_point", crash)


def test_case4_best_checkpoint_matches_results_after_a_kill_between_saves(tmp_path, monkeypatch):
    config = tiny(steps=4, eval_every_steps=2)
    config.data.validation_size = 0  # every evaluation writes best/: deterministic
    kill_at(monkeypatch, "between_saves", 4)
    with pytest.raises(SimulatedKill):
        supervised.run(config, tmp_path)
    stage = tmp_path / "model"
    assert steps_in(stage / ckpt_lib.BEST_DIR) == [2, 4]  # best/4 is ahead of the resume point
    assert steps_in(stage / ckpt_lib.LAST_DIR) == [2]
    monkeypatch.undo()
    results = supervised.run(config, tmp_path)["model"]
    assert results["best_step"] == 4 and steps_in(stage / ckpt_lib.BEST_DIR) == [4]
    assert train_lines(stage) == [1, 2, 3, 4]  # case 11 as well: no repeated lines
    best = ckpt_lib.load_variables(stage)[1]
    assert_same_variables(best, final_params(tmp_path))


# 5. Damaged checkpoint: automatic fallback; disk full: exit 1 -------------------------

def test_case5_damaged_latest_checkpoint_falls_back_to_the_previous(straight, straight_copy,
                                                                     caplog):
    damaged = straight_copy / "model" / ckpt_lib.LAST_DIR / "5"
    for path in (damaged / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    results = supervised.run(kill_config(), straight_copy)["model"]
    assert "unreadable" in caplog.text and results["steps"] == 5
    assert_same_variables(final_params(straight_copy), final_params(straight))  # replayed 5
    assert [p.name.split("-")[:2] for p in (straight_copy / "model" / "damaged").iterdir()] == [
        [ckpt_lib.LAST_DIR, "5"]]
    assert steps_in(straight_copy / "model" / ckpt_lib.BEST_DIR) == [results["best_step"]]


def test_case5_no_readable_checkpoint_and_disk_full_are_runtime_errors(straight_copy, monkeypatch):
    stage = straight_copy / "model"
    for step in (4, 5):
        (stage / ckpt_lib.LAST_DIR / str(step) / "meta" / "metadata").write_text("{")
    with pytest.raises(ckpt_lib.CheckpointError, match="Run the same command again") as err:
        supervised.run(kill_config(), straight_copy)
    assert main.exit_code(err.value) == 1
    assert ckpt_lib.StageCheckpointer(stage, {}, {}).latest_step() is None  # rerun starts over
    assert len(list((stage / "damaged").iterdir())) == 2

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "save", no_space)
    state = types.SimpleNamespace(step=np.int32(9), params={}, batch_stats={})
    with pytest.raises(ckpt_lib.CheckpointError, match="disk full") as err:
        ckpt_lib.StageCheckpointer(stage, {}, {}).save(state, {}, {}, is_best=False)
    assert main.exit_code(err.value) == 1


# 6. A changed config does not resume silently ----------------------------------------

def test_case6_changed_config_is_refused_unless_allowed(straight_copy, capsys, caplog):
    saved_config = (straight_copy / "model" / "config.json").read_text()
    changed = kill_config()
    changed.optim.lr, changed.seed = 0.2, 3
    code, err = run_main(changed, straight_copy, capsys)
    assert code == 2 and "optim.lr: checkpoint 0.1, now 0.2" in err and "seed" in err
    assert "allow_config_change" in err
    assert (straight_copy / "model" / "config.json").read_text() == saved_config
    changed.train.allow_config_change = True
    changed.train.log_every_steps = 7  # not training-relevant: never listed
    assert run_main(changed, straight_copy, capsys)[0] == 0
    assert "optim.lr" in caplog.text and "log_every_steps" not in caplog.text


# 7. Bad values fail at start-up with a clear message ----------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("optim.epochs", 0, "optim.epochs=0"),
    ("train.log_every_steps", 0, "train.log_every_steps=0 must be >= 1"),
])
def test_case7_bad_values_exit_2(tmp_path, capsys, key, value, message):
    config = tiny()
    section, name = key.split(".")
    config[section][name] = value
    code, err = run_main(config, tmp_path, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "model" / "checkpoints").exists()


def test_case7_eval_batch_size_is_checked_before_training(tmp_path):
    stage = loop.Stage(name="model", dir=tmp_path, total_steps=4, steps_per_epoch=2,
                       global_batch_size=64, eval_batch_size=60)
    with pytest.raises(ValueError, match="train.eval_batch_size: batch size 60 is not divisible"):
        loop.check_stage(stage, sharding.make_mesh(8))


def test_case7_vanishing_feature_maps_fail_at_start_up(tmp_path, capsys):
    config = tiny()
    config.model.name, config.data.synthetic_shape = "vgg8", (4, 4, 3)
    code, err = run_main(config, tmp_path, capsys)
    assert code == 2 and "empty feature maps" in err and "stage4" in err


def write_fashion_like(directory, labels, gz=True):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        write_idx_folder(directory, prefix, images, np.asarray(labels, np.uint8), gz=gz)


def test_case7_dataset_labels_and_damaged_files(tmp_path):
    cfg = config_lib.fashion_mnist_data(validation_size=1)
    cfg.data_dir = str(tmp_path)
    write_fashion_like(tmp_path, [0, 9, 3])
    assert data.load_splits(cfg, seed=0).info.num_classes == 10  # from the metadata, not max+1
    write_fashion_like(tmp_path, [0, 200, 3])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: label 200 at index 1"):
        data.load_splits(cfg, seed=0)
    write_fashion_like(tmp_path, [0, 1, 2])
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:40])  # truncated download
    with pytest.raises(ValueError, match=f"{gz} is damaged or truncated.*replace it"):
        data.load_splits(cfg, seed=0)
    hint = data.sources._repair_hint(pathlib.Path(data.sources.DEFAULT_IDX_DIR) / "x.gz")
    assert "apt-get install --reinstall dataset-fashion-mnist" in hint


# 8. Teacher checkpoints: name checked, any topology -----------------------------------

def test_case8_teacher_name_must_match_its_checkpoint(straight, tmp_path, capsys):
    config = tiny(pipeline="kd")
    config.teacher.checkpoint = str(straight / "model")
    config.teacher.name = "resnet14"
    code, err = run_main(config, tmp_path, capsys)
    assert code == 2 and "teacher.name='resnet14'" in err and "'resnet8'" in err


def test_case8_checkpoint_of_2_devices_loads_on_1(straight):
    """``straight`` saved its arrays replicated over a 2-device mesh."""
    script = ("from kdjax.train import checkpoint as c; import jax; "
              f"spec, v = c.load_variables({str(straight / 'model')!r}); "
              "print(spec['name'], len(jax.devices()), jax.tree.leaves(v)[0].shape)")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:2] == ["resnet8", "1"]


# 9. Bad flags: one line, exit 2 ---------------------------------------------------------

def test_case9_bad_flags_are_one_line_and_exit_2(tmp_path):
    workdir = f"--workdir={tmp_path}"
    runs = {
        "unknown config key --config.kd.temprature": kdjax_cli(
            "--config=configs/kd.py", workdir, "--config.kd.temprature=3"),
        "unknown preset 'nonsense'": kdjax_cli("--config=configs/kd.py:nonsense", workdir),
        "--config.optim.lr=abc": kdjax_cli("--config=configs/kd.py", workdir,
                                           "--config.optim.lr=abc"),
    }
    for expected, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("kdjax: error: ")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err


def test_case9_workdir_that_is_a_file_or_read_only_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_main(tiny(), tmp_path / "file", capsys)
    assert code == 2 and "is a file" in err
    # /proc refuses new files even to root (chmod would not stop root).
    code, err = run_main(tiny(), "/proc/kdjax-test", capsys)
    assert code == 2 and "not a writable directory" in err


# 10. Temporary directories of killed saves are removed -------------------------------

def test_case10_unfinished_saves_are_removed_at_start(straight_copy):
    stage = straight_copy / "model"
    left = [stage / ckpt_lib.LAST_DIR / "6.orbax-checkpoint-tmp-123",
            stage / ckpt_lib.BEST_DIR / "6.orbax-checkpoint-tmp-456"]
    for directory in left:
        (directory / "state").mkdir(parents=True)
    ours = stage / ckpt_lib.LAST_DIR / "notes.txt"
    ours.write_text("not orbax's")
    checkpointer = ckpt_lib.StageCheckpointer(stage, {}, {})
    assert not any(d.exists() for d in left) and ours.exists()
    assert checkpointer.latest_step() == 5


# 11. Every JSONL log is cut back to the resumed step ----------------------------------

def test_case11_logs_drop_lines_after_the_resumed_step(tmp_path):
    rows = [{"step": s, "split": "train"} for s in (1, 2, 3, 4)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text)
    (tmp_path / "controller.jsonl").write_text(text + '{"step": 5, "contr')  # killed mid-line
    metrics_lib.truncate_logs(tmp_path, 2)
    for name in ("metrics.jsonl", "controller.jsonl"):
        assert [r["step"] for r in metrics_lib.read_metrics(tmp_path / name)] == [1, 2]


# kill -9 at chosen points, then resume -----------------------------------------------

KILL_ARGS = [*SYNTHETIC, f"--config.data.synthetic_shape={SHAPE}", "--config.data.validation_size=0",
             "--config.optim.epochs=3", "--config.train.max_steps=5",
             "--config.train.eval_every_steps=2", "--config.train.log_every_steps=1",
             "--config.train.num_devices=2"]


KILL_POINTS = ["after_log@3", "inside_last_save@4", "inside_best_save@4", "between_saves@4",
               "after_saves@4"]
DEFAULT_POINTS = ("after_log@3", "inside_last_save@4")


@pytest.mark.parametrize("point", [
    p if p in DEFAULT_POINTS else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS])
def test_kill_9_then_resume_is_bit_identical(point, straight, tmp_path):
    proc = kdjax_cli("--config=configs/supervised.py:demo", f"--workdir={tmp_path}",
                     *KILL_ARGS, env_extra={ckpt_lib.KILL_ENV: point})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -9, err[-2000:]
    stage = tmp_path / "model"
    if point.startswith("inside_"):  # killed with the step's files in orbax's tmp directory
        manager_dir = ckpt_lib.LAST_DIR if "last" in point else ckpt_lib.BEST_DIR
        assert [p.name.split(".")[0] for p in (stage / manager_dir).iterdir()
                if ckpt_lib.ORBAX_TMP_MARK in p.name] == ["4"]
    assert main.run(kill_config(), str(tmp_path)) == 0  # resumes (and takes over the lock)
    assert_same_variables(final_params(tmp_path), final_params(straight))
    assert train_lines(stage) == train_lines(straight / "model") == [1, 2, 3, 4, 5]
    results = json.loads((stage / "results.json").read_text())
    assert results["best_step"] == 5
    assert steps_in(stage / ckpt_lib.BEST_DIR) == [results["best_step"]]
    leftovers = [p for d in (ckpt_lib.LAST_DIR, ckpt_lib.BEST_DIR)
                 for p in (stage / d).iterdir() if ckpt_lib.ORBAX_TMP_MARK in p.name]
    assert leftovers == []
