"""The command line as a user meets it: errors for bad input, SIGTERM, resume."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

SYNTHETIC = [
    "--config.data.source=synthetic", "--config.data.name=synthetic",
    "--config.data.mean=(0.5,0.5,0.5)", "--config.data.std=(0.5,0.5,0.5)",
    "--config.data.validation_size=64", "--config.train.eval_batch_size=64",
    "--config.model.name=resnet8", "--config.optim.batch_size=64",
]


def kdjax_cli(*args, env_extra=None, **popen):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "kdjax.main", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def run_cli(*args, timeout=240):
    proc = kdjax_cli(*args)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_unknown_config_key_fails(tmp_path):
    code, _, err = run_cli("--config=configs/kd.py:demo", f"--workdir={tmp_path}",
                           "--config.kd.temprature=3")
    assert code != 0
    assert "temprature" in err


def test_unknown_model_lists_valid_names(tmp_path):
    code, _, err = run_cli("--config=configs/kd.py:demo", f"--workdir={tmp_path}",
                           "--config.student.name=resnet7")
    assert code == 2
    assert "resnet7" in err and "resnet8x4" in err and "vgg13" in err
    assert not any(tmp_path.iterdir())  # failed before doing anything


def test_missing_dataset_names_dir_and_fix(tmp_path):
    missing = tmp_path / "no-such-data"
    code, _, err = run_cli("--config=configs/kd.py:demo", f"--workdir={tmp_path / 'w'}",
                           f"--config.data.data_dir={missing}")
    assert code == 2
    assert str(missing) in err and "apt-get install" in err


def test_unknown_preset_fails(tmp_path):
    code, _, err = run_cli("--config=configs/kd.py:nonsense", f"--workdir={tmp_path}")
    assert code != 0 and "nonsense" in err


def test_sigterm_saves_and_resume_continues(tmp_path):
    proc = kdjax_cli("--config=configs/supervised.py:demo", f"--workdir={tmp_path}", *SYNTHETIC,
                     "--config.optim.epochs=1000", "--config.train.log_every_steps=1")
    metrics = tmp_path / "model" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and "resume" in err
    saved = [int(p.name) for p in (tmp_path / "model" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved, "no checkpoint written on SIGTERM"
    stopped_at = max(saved)
    code, out, err = run_cli("--config=configs/supervised.py:demo", f"--workdir={tmp_path}",
                             *SYNTHETIC, "--config.optim.epochs=1000",
                             "--config.train.log_every_steps=1",
                             f"--config.train.max_steps={stopped_at + 2}")
    assert code == 0, err[-2000:]
    assert f"resumed from step {stopped_at}" in err
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"train"' in l]
    assert steps[-1] == stopped_at + 2 and steps.count(stopped_at + 1) == 1
