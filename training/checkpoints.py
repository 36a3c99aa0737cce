"""Checkpoints and final models that are whole or absent, and which checkpoint to resume from.

The Trainer writes a checkpoint folder piece by piece (weights, optimizer, scheduler, RNG states, trainer_state.json)
and a process killed or out of disk space mid-save would leave a folder that looks like a checkpoint.
`AtomicSavesMixin` has every checkpoint written under `STAGING_PREFIX` + its name in the same folder and renamed
into place only once whole (a rename within one file system is atomic and needs no space); the final model is
written the same way and moved into output_dir with config.json last. A save that fails stops the run with one line
(`SaveFailed`); the previous complete checkpoint is never touched before the new one is in place. Resuming picks the
newest complete checkpoint and removes staging leftovers, saying so; a checkpoint folder without a valid
`trainer_state.json` (written by other code) is still never picked.
"""

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import CONFIG_NAME

from cli import UserError, missing_path, one_line
from modeling.model_folders import check_weights

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Folders being written: never matched by the Trainer's `checkpoint-*` globs, never uploaded (training.trainer).
STAGING_PREFIX = ".partial-"
FINAL_STAGING = f"{STAGING_PREFIX}final"
# How a failed write surfaces: the OS's error (full disk, quota, permissions, file size limit), torch's zip writer's
# RuntimeError ("unexpected pos ..."), the safetensors writer's own error.
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


class SaveFailed(UserError):
    """A checkpoint or the final model could not be written (disk full, quota, permissions): one line saying what,
    where, the space it needs and what to resume from."""


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def save_failed(what: str, where: Path, err: BaseException, needed_bytes: int | None) -> SaveFailed:
    """The one-line error of a failed save of `what` into `where`."""
    try:
        free = f"{shutil.disk_usage(where if where.exists() else where.parent).free / 2**20:,.0f} MB free there"
    except OSError:
        free = "free space unknown"
    needs = f"it needs about {needed_bytes / 2**20:,.0f} MB ({free})" if needed_bytes else free
    last = last_complete_checkpoint(where, quiet=True)
    resume = (f"the last complete checkpoint is {last}: make room and run the same command again to resume from it"
              if last else "no complete checkpoint to resume from: make room and run the same command again")
    return SaveFailed(f"saving {what} in {where} failed ({one_line(err)}); {needs}; {resume}")


def _move_into_place(source: Path, target: Path) -> None:
    """Renames `source` to `target`, replacing what is there. A file is replaced in one atomic rename; a rename
    cannot replace a folder that has files, so an old folder is moved aside first and deleted last, and one of the
    two is always whole."""
    if not target.is_dir():
        os.replace(source, target)
        return
    aside = target.with_name(f"{STAGING_PREFIX}old-{target.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    os.replace(source, target)
    shutil.rmtree(aside)


def publish_final_model(staging: Path, output_dir: Path) -> None:
    """Moves what `staging` holds into `output_dir`. config.json goes first out and last in: while files move, the
    folder is no model (`check_model_source` refuses a folder without it) rather than a mix of two."""
    (output_dir / CONFIG_NAME).unlink(missing_ok=True)
    entries = sorted(staging.iterdir(), key=lambda path: path.name == CONFIG_NAME)
    for entry in entries:
        _move_into_place(entry, output_dir / entry.name)
    staging.rmdir()


class AtomicSavesMixin:
    """Trainer mixin: each checkpoint is written under `STAGING_PREFIX` + its name and renamed into place when whole;
    a failed save raises `SaveFailed`.

    Private Trainer methods, pinned by tests/training/test_trainer_hooks.py: `_save_checkpoint` (no public hook runs
    before and after the whole of a checkpoint's writing), `_get_output_dir` (where `_save_checkpoint` writes; the
    only way to point it at the staging folder), `_push_from_checkpoint` (held back until the checkpoint is in
    place: the push uploads in the background from the folder it is given).
    """

    _staging: str | None = None
    _push_held_back = False

    def _get_output_dir(self, trial) -> str:
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging is not None:
            self._push_held_back = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging, self._push_held_back = str(staging), False
        try:
            super()._save_checkpoint(model, trial)
        except SAVE_ERRORS as err:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise save_failed(f"checkpoint {name}", run_dir, err, self._checkpoint_bytes(run_dir)) from err
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        final = run_dir / name
        if self.args.should_save:
            _move_into_place(staging / name, final)
            staging.rmdir()
            if self.state.best_model_checkpoint == str(staging / name):
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints(str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
        if self._push_held_back:
            self._push_from_checkpoint(str(final))

    def _checkpoint_bytes(self, run_dir: Path) -> int:
        """What a checkpoint takes: the last complete one's size, or else the trained weights and AdamW's two
        moments."""
        last = last_complete_checkpoint(run_dir, quiet=True)
        if last is not None:
            return _folder_bytes(Path(last))
        trained = sum(p.numel() for p in self.accelerator.unwrap_model(self.model).parameters() if p.requires_grad)
        return self._weight_bytes() + 2 * 4 * trained

    def _weight_bytes(self) -> int:
        """What the model's weights take as saved."""
        return sum(p.numel() * p.element_size() for p in self.accelerator.unwrap_model(self.model).parameters())

    def save_final_weights(self, folder: str) -> None:
        """The Trainer's `save_model` into `folder`, without the push it adds when `push_to_hub` is set: that push
        uploads output_dir, which the final model reaches only after `save_final_model` has moved it there
        (`_internal_call` is the Trainer's own switch for it; tests/training/test_trainer_hooks.py pins it)."""
        self.save_model(folder, _internal_call=True)

    def save_final_model(self, save: Callable[[str], None], output_dir: str) -> None:
        """Calls `save(folder)` on every process with a staging folder, then moves the result into `output_dir`."""
        output_dir = Path(output_dir)
        staging = output_dir / FINAL_STAGING
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            save(str(staging))
        except SAVE_ERRORS as err:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise save_failed("the final model", output_dir, err, self._weight_bytes()) from err
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_final_model(staging, output_dir)
        self.accelerator.wait_for_everyone()


def is_complete_checkpoint(folder: str | Path) -> bool:
    """True when `folder/trainer_state.json` exists, parses, and names the folder's own step."""
    folder = Path(folder)
    match = _CHECKPOINT.match(folder.name)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return match is not None and state.get("global_step") == int(match.group(1))


def remove_staging_leftovers(output_dir: str | Path) -> None:
    """Deletes what a save that never finished left under `output_dir` (`STAGING_PREFIX` folders), saying so."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for path in sorted(output_dir.glob(f"{STAGING_PREFIX}*")):
        logger.warning("removing %s: a save that did not finish (the process was killed while writing it)", path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def last_complete_checkpoint(output_dir: str | Path, quiet: bool = False) -> str | None:
    """The newest complete `checkpoint-N` under `output_dir` (None if there is none); incomplete ones are logged
    (not when `quiet`)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (m := _CHECKPOINT.match(path.name))
    )
    for _, path in reversed(found):
        if is_complete_checkpoint(path):
            return str(path)
        if not quiet:
            logger.warning("ignoring %s: it was not written completely (no valid trainer_state.json)", path)
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """Turns `--resume_from_checkpoint` (a path, True/"true" for the newest, or None) into a complete checkpoint.

    Without the flag, a previous run's checkpoints in `output_dir` are resumed from too, as transformers' example
    scripts do. The weights of the checkpoint are checked (`check_weights`); a mistake is a `UserError`.
    """
    if resume_from_checkpoint in (None, False, "false", "False"):
        found = last_complete_checkpoint(output_dir)
    elif resume_from_checkpoint in (True, "true", "True"):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise UserError(
                f"--resume_from_checkpoint: no complete checkpoint in {output_dir}; leave the option out to start "
                "from the beginning, or give the output_dir of the run to continue"
            )
    else:
        found = os.fspath(resume_from_checkpoint)
        if not os.path.exists(found):
            raise missing_path("--resume_from_checkpoint", found, "a checkpoint-N folder, or true for the newest")
        if not is_complete_checkpoint(found):
            raise UserError(
                f"{found} is not a complete checkpoint (no valid trainer_state.json): the run that wrote it "
                "probably died while saving; resume from an earlier checkpoint-N"
            )
    if found is not None:
        check_weights(found)
    return found
