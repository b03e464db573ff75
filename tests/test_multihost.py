"""Several JAX processes on localhost train as one: the multi-host path, proven on CPU.

Each case starts ``python -m kdjax.main`` processes that join one run through
``jax.distributed`` (coordinator on a free localhost port, one CPU device per process,
gloo collectives) and compares them with a single process holding as many simulated
devices. Every process records the files it opens for writing and the renames it
makes (a Python audit hook installed through ``sitecustomize``), so the tests can say
which process wrote which file.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from kdjax.train import checkpoint as ckpt_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGE = "model"
TIMEOUT = 420  # seconds for one run of the CLI (compiles dominate on a loaded CPU)

# 192 training examples at batch 32 = 6 steps per epoch; small images keep steps fast.
TINY = [
    "--config=configs/supervised.py:demo",
    "--config.data.source=synthetic", "--config.data.name=synthetic",
    "--config.data.synthetic_train=256", "--config.data.synthetic_test=64",
    "--config.data.synthetic_shape=(16,16,3)",
    "--config.data.mean=(0.5,0.5,0.5)", "--config.data.std=(0.5,0.5,0.5)",
    "--config.data.validation_size=64", "--config.train.eval_batch_size=64",
    "--config.model.name=resnet8", "--config.optim.batch_size=32",
    "--config.train.log_every_steps=1",
]

# Logs, per process, every file opened for writing and every rename/replace target;
# installs the fake gs:// when asked (tests/fake_gcs.py).
AUDIT_HOOK = textwrap.dedent("""
    import os, sys
    if os.environ.get("KDJAX_TEST_FAKE_GCS"):
        import fake_gcs
        fake_gcs.install(os.environ["KDJAX_TEST_FAKE_GCS"])
    _log = open(os.environ["KDJAX_TEST_AUDIT"], "a", buffering=1)
    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and isinstance(args[1], str) \\
                and any(c in args[1] for c in "wax+"):
            _log.write(args[0] + "\\n")
        elif event in ("os.rename", "os.replace") and isinstance(args[1], str):
            _log.write(args[1] + "\\n")
    sys.addaudithook(_hook)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(workdir, *overrides, processes=1, devices=1, hook_dir=None, env=None):
    """Start one run of the CLI as ``processes`` processes with ``devices`` CPU devices each."""
    hook_dir = pathlib.Path(hook_dir or workdir.parent / "hook")
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
    distributed = []
    if processes > 1:
        distributed = ["--config.train.distributed=True", f"--config.train.num_processes={processes}",
                       f"--config.train.coordinator_address=localhost:{free_port()}"]
    procs = []
    for i in range(processes):
        process_env = dict(os.environ, **(env or {}), JAX_PLATFORMS="cpu",
                           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                           PYTHONPATH=os.pathsep.join([str(hook_dir), str(REPO / "tests"),
                                                       str(REPO)]),
                           KDJAX_TEST_AUDIT=str(hook_dir / f"process_{i}.log"))
        args = [*TINY, f"--workdir={workdir}", *overrides, *distributed]
        if processes > 1:
            args.append(f"--config.train.process_id={i}")
        procs.append(subprocess.Popen([sys.executable, "-m", "kdjax.main", *args], cwd=REPO,
                                      env=process_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def finish(procs, timeout=TIMEOUT) -> list[tuple[int, str]]:
    """Wait for every process (killing all on timeout); [(exit code, stderr)]."""
    results = []
    deadline = time.time() + timeout
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=max(1, deadline - time.time()))
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def run(workdir, *overrides, **options):
    """Run the CLI to the end (see ``start``); every process must exit 0."""
    results = finish(start(workdir, *overrides, **options))
    for i, (code, err) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"
    return results


def final_params(workdir) -> dict:
    """The parameters of the stage's newest resume checkpoint, as flat numpy arrays."""
    _, variables = ckpt_lib.load_variables(workdir / STAGE, prefer=ckpt_lib.LAST_DIR)
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)


def written(audit_log: pathlib.Path, workdir: pathlib.Path, suffixes) -> set[str]:
    """Paths under ``workdir`` (relative) with one of ``suffixes`` a process wrote or renamed to."""
    if not audit_log.exists():
        return set()
    found = set()
    for line in audit_log.read_text().splitlines():
        path = pathlib.Path(line)
        if path.is_relative_to(workdir) and any(s in path.name for s in suffixes):
            found.add(str(path.relative_to(workdir)))
    return found


REPORTS = (".json", ".md", ".png", "tfevents")  # .json also matches .jsonl


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with two simulated devices, 4 steps: the run the others must equal."""
    workdir = tmp_path_factory.mktemp("one") / "w"
    run(workdir, "--config.train.max_steps=4", processes=1, devices=2)
    return final_params(workdir)


def test_two_processes_equal_one_and_only_process_0_writes(tmp_path, reference):
    workdir = tmp_path / "w"
    results = run(workdir, "--config.train.max_steps=4", processes=2)
    assert "mesh {'data': 2}" in results[0][1]
    assert_same_params(final_params(workdir), reference)
    hooks = tmp_path / "hook"
    first = written(hooks / "process_0.log", workdir, REPORTS)
    assert {f"{STAGE}/results.json", f"{STAGE}/config.json", f"{STAGE}/metrics.jsonl"} <= first
    assert written(hooks / "process_1.log", workdir, REPORTS) == set()
    lines = (workdir / STAGE / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"train"' in line]
    assert steps == [1, 2, 3, 4]  # one line per logged step, not one per process


@pytest.mark.slow
def test_checkpoint_moves_between_two_processes_and_one(tmp_path, reference):
    """2 processes write steps 1-2, one process resumes to 4; and the other way round.
    Both must end exactly where the uninterrupted one-process run ends."""
    two_then_one = tmp_path / "a"
    run(two_then_one, "--config.train.max_steps=2", processes=2)
    run(two_then_one, "--config.train.max_steps=4", processes=1, devices=2)
    assert_same_params(final_params(two_then_one), reference)
    one_then_two = tmp_path / "b"
    run(one_then_two, "--config.train.max_steps=2", processes=1, devices=2)
    run(one_then_two, "--config.train.max_steps=4", processes=2)
    assert_same_params(final_params(one_then_two), reference)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_with_a_checkpoint(tmp_path):
    workdir = tmp_path / "w"
    procs = start(workdir, "--config.optim.epochs=1000", processes=2)
    metrics = workdir / STAGE / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and metrics.read_text().count('"train"') >= 2:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), finish(procs, 5)
    procs[1].send_signal(signal.SIGTERM)  # the process that writes no report
    results = finish(procs, timeout=180)
    for i, (code, err) in enumerate(results):
        assert code == 143, f"process {i} exited {code}:\n{err[-3000:]}"
        assert "SIGTERM" in err
    saved = [int(p.name) for p in (workdir / STAGE / ckpt_lib.LAST_DIR).iterdir()
             if p.name.isdigit()]
    stopped = [int(err.split("checkpoint saved at step ")[1].split()[0]) for _, err in results]
    assert stopped[0] == stopped[1] == max(saved)


@pytest.mark.slow
def test_gs_workdir_holds_every_file_and_resumes(tmp_path, monkeypatch):
    """A whole run with ``--workdir=gs://bucket/run`` on the fake gs:// (tests/fake_gcs.py):
    every report and checkpoint lands in the bucket, nothing in a local ``gs:`` folder, and
    a second run resumes from the bucket's checkpoint."""
    import fake_gcs

    bucket = tmp_path / "bucket-store"
    env = {fake_gcs.ENV: str(bucket)}
    options = dict(processes=1, devices=2, hook_dir=tmp_path / "hook", env=env)
    run("gs://bkt/run", "--config.train.max_steps=2", **options)
    _, err = run("gs://bkt/run", "--config.train.max_steps=3", **options)[0]
    assert "resumed from step 2" in err
    stage = bucket / "bkt" / "run" / STAGE
    assert {"config.json", "results.json", "metrics.jsonl"} <= {p.name for p in stage.iterdir()}
    steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == [1, 2, 3]
    assert json.loads((stage / "results.json").read_text())["steps"] == 3
    assert sorted(int(p.name) for p in (stage / ckpt_lib.LAST_DIR).iterdir()) == [2, 3]
    assert not (REPO / "gs:").exists()  # the runs' working directory
    from orbax.checkpoint._src.path import gcs_utils

    for name in ("is_hierarchical_namespace_enabled", "get_kvstore_for_gcs"):
        monkeypatch.setattr(gcs_utils, name, getattr(gcs_utils, name))  # restored after
    fake_gcs.install(str(bucket))  # this process reads the checkpoint through gs:// too
    spec, variables = ckpt_lib.load_variables("gs://bkt/run/model", prefer=ckpt_lib.LAST_DIR)
    assert spec["name"] == "resnet8" and "params" in variables
