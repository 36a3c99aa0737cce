"""One run per output folder: a second run into a folder in use stops with one line naming the first; a lock
whose process has died is taken over with a warning."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cli import UserError
from tests.training.launch import REPO, TIMEOUT_S, finish, script_env, stage1_args, start
from training.output_lock import LOCK_NAME, OutputDirLock

HOLD = """
import sys, time
from training.output_lock import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/out."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], cwd=REPO, env=script_env(),
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_a_second_run_stops_naming_the_first(holder, tmp_path):
    with pytest.raises(UserError, match=rf"out is in use by another run \(PID {holder.pid} on "
                                        rf"{socket.gethostname()}, started .*\); wait for it"):
        OutputDirLock(tmp_path / "out").acquire()


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(holder, tmp_path, caplog):
    holder.kill()
    holder.wait()
    lock = OutputDirLock(tmp_path / "out")
    lock.acquire()
    assert f"taking over the lock of a run that is no longer running (PID {holder.pid} on" in caplog.text
    assert json.loads((tmp_path / "out" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_reused_pid_is_not_taken_for_the_run(tmp_path, caplog):
    # A live PID (our parent's) with another start time: the run that wrote the lock died and its PID went on.
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                                  "process_start": "1", "started": time.time()}))
    OutputDirLock(tmp_path).acquire()
    assert "taking over the lock of a run that is no longer running" in caplog.text


def test_a_lock_of_another_host_stops_the_run_and_says_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "other-node", "pid": 1, "started": time.time()}))
    with pytest.raises(UserError, match=rf"in use by another run \(PID 1 on other-node.*if that run has ended, "
                                        rf"delete {tmp_path / LOCK_NAME}"):
        OutputDirLock(tmp_path).acquire()


def test_the_same_process_may_start_again_and_leaves_anothers_lock_alone(tmp_path):
    first, again = OutputDirLock(tmp_path), OutputDirLock(tmp_path)
    first.acquire()
    again.acquire()  # a second stage in one process (the demo) or a script's main called twice
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "other-node", "pid": 1, "started": 0}))
    first.release()
    assert (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_two_training_runs_into_one_folder(shapes_data, tmp_path):
    out = tmp_path / "run"
    first = start("training.train_qformer", stage1_args(shapes_data, out, max_steps=400), tmp_path / "first.log")
    deadline = time.monotonic() + TIMEOUT_S
    while "'loss'" not in (tmp_path / "first.log").read_text():
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "training.train_qformer",
                             *stage1_args(shapes_data, out, max_steps=4)],
                            cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert second.returncode == 2, second.stderr[-3000:]
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"error: output_dir {out} is in use by another run (PID {first.pid} on "), line
    assert first.poll() is None, "the first run goes on"
    finish(first, tmp_path / "first.log")
    assert (out / "model.safetensors").exists() and not (out / LOCK_NAME).exists()


def test_a_lock_without_a_pid_is_no_runs(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": time.time()}))
    OutputDirLock(tmp_path).acquire()
    assert "taking over the lock of a run that is no longer running" in caplog.text
