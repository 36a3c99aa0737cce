"""A preempted or interrupted run (SIGUSR1 as SLURM sends ahead of a job's end, SIGTERM to torchrun as a scheduler
stopping a job sends it, SIGINT as Ctrl-C sends it, on one process and through torchrun) writes a complete
checkpoint at the next step, exits cleanly, and the same command run again ends where an uninterrupted run ends."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.training.launch import (
    REPO,
    TIMEOUT_S,
    logged_losses,
    max_weight_difference,
    run,
    run_torchrun,
    script_env,
    stage1_args,
    start,
    trainer_state,
)
from training.checkpoints import is_complete_checkpoint
from training.preemption import REPEAT_WINDOW_S

# Long enough that a run signalled after its third logged step is still training (a step takes ~30 ms here).
STEPS = 40
WEIGHT_TOLERANCE = 1e-6


# Slow tier (`make test`, not `make test-fast`): trains through the real scripts and signals them.
pytestmark = pytest.mark.slow


def signal_after_step_3(process: subprocess.Popen, log: Path, send) -> None:
    """Calls `send()` once the run has logged the loss of its third step, then waits for the run to end."""
    deadline = time.monotonic() + TIMEOUT_S
    while log.read_text().count("'loss'") < 3:
        assert process.poll() is None, f"the run ended before step 3:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, "no third step in time"
        time.sleep(0.005)
    send()
    process.wait(timeout=TIMEOUT_S)


def checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"))


def torchrun(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "training.train_qformer", *args],
            cwd=REPO, env=script_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def assert_resumed_run_equals_uninterrupted(resumed: Path, reference: Path) -> None:
    assert trainer_state(resumed)["global_step"] == STEPS
    difference = max_weight_difference(reference / "model.safetensors", resumed / "model.safetensors")
    losses, expected = logged_losses(resumed), logged_losses(reference)
    print(f"max |weight diff| {difference:.1e}, {len(losses)} logged losses, equal: {losses == expected}")
    assert difference <= WEIGHT_TOLERANCE
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))
    assert losses == expected


# SIGUSR1: a scheduler's notice, a clean stop (0); SIGINT: Ctrl-C, an interrupted command (130).
@pytest.mark.parametrize("signum, status", [(signal.SIGUSR1, 0), (signal.SIGINT, 130)], ids=["SIGUSR1", "SIGINT"])
def test_a_signal_on_one_process_checkpoints_and_the_rerun_resumes_exactly(shapes_data, tmp_path, signum, status):
    reference, preempted = tmp_path / "uninterrupted", tmp_path / "preempted"
    run("training.train_qformer", stage1_args(shapes_data, reference, max_steps=STEPS), tmp_path / "reference.log")

    # save_strategy "no" (the tiny YAML's): the preemption checkpoint is the only one.
    args = stage1_args(shapes_data, preempted, max_steps=STEPS)
    log = tmp_path / "preempted.log"
    process = start("training.train_qformer", args, log)
    signal_after_step_3(process, log, lambda: process.send_signal(signum))
    output = log.read_text()
    assert process.returncode == status, output[-4000:]
    [checkpoint] = checkpoints(preempted)
    step = int(checkpoint.name.split("-")[1])
    assert 3 <= step < STEPS and is_complete_checkpoint(checkpoint)
    assert f"stopped by {signum.name} at step {step}; checkpoint saved in {checkpoint}" in output
    assert "Resume from it with the same command: " in output and "-m training.train_qformer" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert not (preempted / "model.safetensors").exists(), "a preempted run skips the final save"

    output = run("training.train_qformer", args, tmp_path / "rerun.log")  # the same command, nothing added
    assert f"loading weights from {checkpoint} " in output
    assert_resumed_run_equals_uninterrupted(preempted, reference)


# SIGTERM: a scheduler stopping the job; SIGINT: Ctrl-C in the terminal, which torchrun forwards the same way.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_torchrun_checkpoints_every_rank_and_the_rerun_resumes_exactly(shapes_data, tmp_path, signum):
    reference, preempted = tmp_path / "uninterrupted", tmp_path / "preempted"
    run_torchrun(["-m", "training.train_qformer", *stage1_args(shapes_data, reference, max_steps=STEPS)],
                 tmp_path / "reference.log")

    args = stage1_args(shapes_data, preempted, max_steps=STEPS)
    log = tmp_path / "preempted.log"
    process = torchrun(args, log)
    # torchrun forwards the signal to each worker (they run in sessions of their own).
    signal_after_step_3(process, log, lambda: process.send_signal(signum))
    output = log.read_text()
    [checkpoint] = checkpoints(preempted)
    step = int(checkpoint.name.split("-")[1])
    assert 3 <= step < STEPS and is_complete_checkpoint(checkpoint)
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert output.count(f"received {signum.name}: saving a checkpoint") == 2, output[-4000:]
    assert f"stopped by {signum.name} at step {step}" in output
    assert "Run the same launch command again" in output
    # The workers stopped cleanly; torchrun itself re-raises the signal it got once they are done.
    assert "ChildFailedError" not in output and "exitcode" not in output, output[-4000:]

    output = run_torchrun(["-m", "training.train_qformer", *args], tmp_path / "rerun.log")
    assert_resumed_run_equals_uninterrupted(preempted, reference)


SIGNAL_TWICE = textwrap.dedent("""
    import os, signal, sys, time
    from accelerate import Accelerator
    from training.preemption import PreemptionCallback
    callback = PreemptionCallback(Accelerator(cpu=True))
    callback.on_train_begin(None, None, None)
    first, second = signal.Signals[sys.argv[2]], signal.Signals[sys.argv[3]]
    os.kill(os.getpid(), first)
    os.kill(os.getpid(), first)  # a repeat within the window: the same notice
    print("survived the repeat", flush=True)
    time.sleep(float(sys.argv[1]))
    os.kill(os.getpid(), second)  # a second notice after the window
    time.sleep(1)
    print("survived the second signal", flush=True)
""")


@pytest.mark.parametrize("first, second", [("SIGTERM", "SIGUSR1"), ("SIGINT", "SIGINT")])
def test_a_second_signal_after_the_repeat_window_ends_the_process_at_once(first, second):
    gap_s = REPEAT_WINDOW_S + 0.5
    process = subprocess.run([sys.executable, "-c", SIGNAL_TWICE, str(gap_s), first, second], cwd=REPO,
                             env=script_env(), capture_output=True, text=True, timeout=60)
    assert "survived the repeat" in process.stdout, process.stderr
    assert "survived the second signal" not in process.stdout
    assert process.returncode == -signal.Signals[second], process.stderr
    assert f"received {second} again: stopping now, without a checkpoint" in process.stderr

