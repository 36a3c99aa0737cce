"""Faults while saving lose no work: a full disk (a file size limit, RLIMIT_FSIZE, set on the real training
process) stops the run with one line and leaves the previous checkpoint whole for an exact resume; a process killed
while writing a checkpoint leaves nothing that resume takes for one."""

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modeling.model_folders import check_weights
from tests.training.launch import REPO, TIMEOUT_S, kill_tree, max_weight_difference, run, script_env, stage1_args
from training.checkpoints import STAGING_PREFIX, is_complete_checkpoint

STEPS, SAVE_STEPS = 8, 4

# Slow tier (`make test`, not `make test-fast`): trains through the real scripts.
pytestmark = pytest.mark.slow


def run_with_file_size_limit(args: list[str], limit_bytes: int) -> subprocess.CompletedProcess:
    """The stage-1 script with no file it writes allowed past `limit_bytes`: a write past it fails as on a full disk
    (EFBIG; Python ignores the SIGXFSZ that would otherwise kill the process). Output goes to pipes, which the limit
    does not cover."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "training.train_qformer", *args], cwd=REPO, env=script_env(),
                          preexec_fn=limit, capture_output=True, text=True, timeout=TIMEOUT_S)


def largest_file(folder: Path) -> int:
    return max(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_one_line(process: subprocess.CompletedProcess) -> str:
    """The run's error: one line, the last on stderr (above it, the progress bars and warnings of the run)."""
    assert process.returncode == 2, process.stdout[-3000:] + process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and process.stderr.strip().splitlines()[-1] == errors[0], process.stderr[-3000:]
    assert "Traceback" not in process.stdout + process.stderr
    return errors[0]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_whole_and_resume_is_exact(shapes_data, tmp_path):
    reference, faulty = tmp_path / "uninterrupted", tmp_path / "faulty"
    fields = {"max_steps": STEPS, "save_strategy": "steps", "save_steps": SAVE_STEPS}
    run("training.train_qformer", stage1_args(shapes_data, reference, **fields), tmp_path / "reference.log")
    # The same run up to its first checkpoint, then a disk that takes nothing as large as a checkpoint's files.
    previous = faulty / f"checkpoint-{SAVE_STEPS}"
    faulty.mkdir()
    subprocess.run(["cp", "-r", str(reference / previous.name), str(previous)], check=True)
    before = snapshot(previous)
    args = stage1_args(shapes_data, faulty, **fields)

    line = assert_one_line(run_with_file_size_limit(args, largest_file(previous) // 2))
    assert f"saving checkpoint checkpoint-{STEPS} in {faulty} failed (" in line
    assert "MB free there" in line and "needs about" in line
    assert f"the last complete checkpoint is {previous}: make room and run the same command again" in line
    assert snapshot(previous) == before, "the previous checkpoint was touched"
    assert sorted(p.name for p in faulty.iterdir() if not p.name.startswith(".run.lock")) == [previous.name], \
        "the failed save left something behind"

    output = run("training.train_qformer", args, tmp_path / "rerun.log")  # room again: the same command
    assert f"loading weights from {previous} " in output
    assert max_weight_difference(reference / "model.safetensors", faulty / "model.safetensors") <= 1e-6


def test_a_full_disk_at_the_final_save_leaves_no_half_model(shapes_data, tmp_path):
    out = tmp_path / "run"
    process = run_with_file_size_limit(stage1_args(shapes_data, out, max_steps=2, do_eval=False), 20_000)
    line = assert_one_line(process)
    assert f"saving the final model in {out} failed (" in line and "no complete checkpoint to resume from" in line
    assert not any(out.glob("*.safetensors")) and not (out / "config.json").exists()
    assert not any(out.glob(f"{STAGING_PREFIX}*"))


def test_a_process_killed_while_saving_leaves_no_checkpoint_that_resume_would_take(shapes_data, tmp_path):
    out = tmp_path / "run"
    args = stage1_args(shapes_data, out, max_steps=400, save_strategy="steps", save_steps=1)
    log = tmp_path / "killed.log"
    with open(log, "w") as stream:
        process = subprocess.Popen([sys.executable, "-m", "training.train_qformer", *args], cwd=REPO,
                                   env=script_env(), stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    # Every step saves; kill -9 the moment a checkpoint's staging folder holds a file, after a few whole ones.
    deadline = time.monotonic() + TIMEOUT_S
    while len(list(out.glob("checkpoint-*"))) < 3 or not any(out.glob(f"{STAGING_PREFIX}checkpoint-*/*/*")):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
    kill_tree(process.pid)
    process.wait()
    [leftover] = out.glob(f"{STAGING_PREFIX}checkpoint-*")
    for checkpoint in out.glob("checkpoint-*"):
        assert is_complete_checkpoint(checkpoint), checkpoint
        check_weights(checkpoint)
    newest = max(out.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))

    # The same command again: the dead run's lock and the leftover go, saying so, and training resumes from the
    # newest whole checkpoint. (Stopped at its first logged step: the resume is what is checked here.)
    rerun = subprocess.Popen([sys.executable, "-m", "training.train_qformer", *args], cwd=REPO, env=script_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = ""
    for line in rerun.stdout:
        output += line
        if "'loss'" in line:
            break
    kill_tree(rerun.pid)
    rerun.wait()
    assert f"removing {leftover}: a save that did not finish" in output, output[-3000:]
    assert "taking over the lock of a run that is no longer running" in output
    assert f"loading weights from {newest} " in output
