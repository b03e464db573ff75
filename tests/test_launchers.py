"""Launchers (launch/tpu_vm.sh, launch/multi_gpu.sh) through their dry runs, shellcheck,
and the distributed settings they pass to jax.distributed.initialize."""

import os
import pathlib
import shutil
import subprocess
import tarfile

import jax
import pytest

from kdjax import config_lib
from kdjax.train import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
TUPLE_OVERRIDE = "--config.optim.milestones=(82,123)"
SPACED_OVERRIDE = "--config.note=two words; $(not run)"
TPU_ARGS = ["my-tpu", "us-central2-b", "configs/kd.py", "gs://bucket/run"]


def launch(script, *args, env=None):
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def shell_words(line: str) -> list[str]:
    """The argument vector bash builds from ``line`` (its quoting undone). Restricted bash
    (-r): should quoting fail, a stray redirection cannot write files."""
    out = subprocess.run(["bash", "-r", "-c", 'printf "%s\\0" ' + line], capture_output=True,
                         text=True, check=True).stdout
    return out.split("\0")[:-1]


def commands(stdout: str) -> list[list[str]]:
    return [shell_words(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def kdjax_words(script_text: str) -> list[str]:
    """The kdjax.main arguments of the remote script (up to a redirection, if detached)."""
    (line,) = [line for line in script_text.splitlines() if "-m kdjax.main" in line]
    return shell_words(line[line.index("-m kdjax.main"):].split(" > ")[0])


needs_git = pytest.mark.skipif(not (REPO / ".git").exists(),
                               reason="tpu_vm.sh ships tracked files: needs a git checkout")


def tpu_dry_run(*options, env=None):
    result = launch("tpu_vm.sh", "--dry-run", *options, *TPU_ARGS, TUPLE_OVERRIDE, SPACED_OVERRIDE,
                    env=env)
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    (ssh,) = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    (remote,) = [a[len("--command="):] for a in ssh if a.startswith("--command=")]
    return cmds, ssh, remote


@needs_git
def test_tpu_vm_remote_command_keeps_every_argument_intact():
    cmds, ssh, remote = tpu_dry_run(env={"TFDS_DATA_DIR": "gs://bucket/tensorflow datasets"})
    assert "--worker=all" in ssh and "my-tpu" in ssh and "--zone=us-central2-b" in ssh
    subprocess.run(["bash", "-n", "-c", remote], check=True)  # the remote script parses
    words = kdjax_words(remote)
    assert words[:2] == ["-m", "kdjax.main"]
    assert words[2:] == ["--config=configs/kd.py", "--workdir=gs://bucket/run",
                         "--config.train.distributed=True", TUPLE_OVERRIDE, SPACED_OVERRIDE]
    (export,) = [line for line in remote.splitlines() if line.startswith("export TFDS_DATA_DIR=")]
    assert shell_words(export[len("export "):]) == ["TFDS_DATA_DIR=gs://bucket/tensorflow datasets"]
    assert "sys.version_info < (3, 11)" in remote and "-c src/constraints.txt" in remote
    assert not any(c[0] == "gcloud" and "create" in c for c in cmds)  # reuse unless --create


@needs_git
def test_tpu_vm_ships_a_git_archive_of_tracked_files_only(tmp_path):
    cmds, _, remote = tpu_dry_run()
    (archive_cmd,) = [c for c in cmds if c[:2] == ["git", "archive"]]
    (scp,) = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    (output,) = [a for a in archive_cmd if a.startswith("--output=")]
    assert scp[5] == output[len("--output="):] and "--worker=all" in scp
    assert "--recurse" not in scp and ".venv" not in remote
    # Run the printed git archive (into tmp_path) and look inside.
    out = tmp_path / "src.tar.gz"
    subprocess.run([a for a in archive_cmd if a != output] + [f"--output={out}"], cwd=REPO,
                   check=True)
    names = tarfile.open(out).getnames()
    assert "pyproject.toml" in names and "constraints.txt" in names and "launch/tpu_vm.sh" in names
    assert not [n for n in names if n.split("/")[0] in (".git", ".venv", ".pytest_cache")]


@needs_git
def test_tpu_vm_create_and_detach():
    cmds, _, remote = tpu_dry_run("--create=v4-32", "--spot", "--detach", "--project=p")
    (create,) = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]]
    assert {"--accelerator-type=v4-32", "--spot", "--project=p", "--zone=us-central2-b"} <= set(create)
    (start,) = [line for line in remote.splitlines() if "-m kdjax.main" in line]
    assert start.startswith("nohup ") and "> ../run.log" in start and "&" in start
    assert kdjax_words(remote)[-2:] == [TUPLE_OVERRIDE, SPACED_OVERRIDE]


@pytest.mark.parametrize("args", [TPU_ARGS[:3], [*TPU_ARGS[:3], "relative/dir"], ["--bogus", *TPU_ARGS]])
def test_tpu_vm_bad_arguments_exit_2(args):
    result = launch("tpu_vm.sh", "--dry-run", *args)
    assert result.returncode == 2 and "tpu_vm.sh" in result.stderr and not result.stdout


def test_multi_gpu_passes_explicit_coordinator_settings():
    result = launch("multi_gpu.sh", "--dry-run", "--coordinator=10.0.0.1:1234", "--num-processes=2",
                    "--process-id=1", "configs/kd.py", "/shared/run", TUPLE_OVERRIDE)
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert any("constraints.txt" in c and ".[train,cuda12]" in c for c in cmds)
    run = cmds[-1]
    assert run[1:] == ["-m", "kdjax.main", "--config=configs/kd.py", "--workdir=/shared/run",
                       "--config.train.distributed=True",
                       "--config.train.coordinator_address=10.0.0.1:1234",
                       "--config.train.num_processes=2", "--config.train.process_id=1",
                       TUPLE_OVERRIDE]
    single = commands(launch("multi_gpu.sh", "--dry-run", "configs/kd.py", "/tmp/r").stdout)[-1]
    assert not [a for a in single if "train." in a]
    auto = commands(launch("multi_gpu.sh", "--dry-run", "--auto", "configs/kd.py", "/tmp/r").stdout)[-1]
    assert [a for a in auto if "train." in a] == ["--config.train.distributed=True"]


def test_multi_gpu_partial_coordinator_settings_exit_2():
    result = launch("multi_gpu.sh", "--dry-run", "--process-id=1", "configs/kd.py", "/tmp/r")
    assert result.returncode == 2 and "go together" in result.stderr


def test_shell_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it with apt-get)")
    scripts = [*sorted(str(p) for p in (REPO / "launch").glob("*.sh")), str(REPO / ".ci/run")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# --- train.distributed / coordinator_address / num_processes / process_id -------------

def train(**overrides):
    settings = config_lib.train_settings()
    settings.update(overrides)
    return settings


def test_distributed_settings_reach_jax_distributed_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    sharding.initialize_distributed(train())  # single process: nothing happens
    sharding.initialize_distributed(train(distributed=True))  # auto-detection
    sharding.initialize_distributed(train(distributed=True, coordinator_address="h:1234",
                                          num_processes=4, process_id=3))
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None),
                     dict(coordinator_address="h:1234", num_processes=4, process_id=3)]
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    sharding.initialize_distributed(train(distributed=True))  # a second stage: already joined
    assert len(calls) == 2


@pytest.mark.parametrize("overrides, key", [
    (dict(num_processes=2), "train.distributed=False"),
    (dict(distributed=True, num_processes=0), "train.num_processes=0"),
    (dict(distributed=True, num_processes=2, process_id=2), "train.process_id=2"),
    (dict(distributed=True, process_id=-3), "train.process_id=-3"),
])
def test_bad_distributed_settings_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        sharding.distributed_kwargs(train(**overrides))
