"""Preemption: a signal makes the run save a complete checkpoint at the next step boundary and stop cleanly.

SIGTERM is what a spot instance, Kubernetes or SLURM sends before killing a job, SIGUSR1 what SLURM sends ahead of
the end of a job's time with `--signal=USR1@<seconds>`, SIGINT what Ctrl-C sends. Without this, a preempted or
interrupted run loses everything since its last periodic checkpoint. The handler only notes the signal; the
decision is taken after the optimizer step, on every process together (accelerate's trigger, one all-reduce per
step), so that N processes stop at the same step and none waits in a collective for a peer that has stopped.

A second signal ends the process at once, without a checkpoint, unless it comes within `REPEAT_WINDOW_S` of the
first: then it is the same notice delivered twice. That happens when every process is signalled (a machine
shutting down, or Ctrl-C in the terminal of a `torchrun`/`accelerate launch`): each worker gets the signal itself
and again from torchrun, which forwards what it receives to its workers.
"""

import logging
import os
import signal
import time

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


class TrainingPreempted(SystemExit):
    """Raised once the preemption checkpoint is written: nothing after training runs (no evaluation, no final save,
    no next stage of the demo). The process exits with status 0, as a scheduler expects of a clean stop, or after
    Ctrl-C with 130, as a shell expects of an interrupted command."""

    def __init__(self, received: signal.Signals | None):
        super().__init__(130 if received == signal.SIGINT else 0)


class PreemptionCallback(TrainerCallback):
    """Catches `PREEMPTION_SIGNALS` during `trainer.train()`; `stopped_at` is the step of the checkpoint it made."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: signal.Signals | None = None
        self.received_at = 0.0
        self.stopped_at: int | None = None
        self._previous = {}

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum), time.monotonic()
            logger.warning("received %s: saving a checkpoint after this step, then stopping (send it again to stop "
                           "at once, without a checkpoint)", self.received.name)
        elif time.monotonic() - self.received_at > REPEAT_WINDOW_S:
            logger.warning("received %s again: stopping now, without a checkpoint", signal.Signals(signum).name)
            self._restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in PREEMPTION_SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            self.accelerator.set_trigger()
        if self.accelerator.check_trigger():  # True on every process when any process was signalled
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()


__all__ = ["PREEMPTION_SIGNALS", "PreemptionCallback", "TrainingPreempted"]
