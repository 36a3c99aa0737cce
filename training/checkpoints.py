"""Which checkpoint to resume from: the newest one that was written completely.

The Trainer writes a checkpoint folder piece by piece (weights, optimizer, scheduler, RNG states) and
`trainer_state.json` last. A process killed mid-save leaves a folder without that file, or with a truncated one;
`transformers.trainer_utils.get_last_checkpoint` would still pick it, so we check before resuming.
"""

import json
import logging
import os
import re
from pathlib import Path

from cli import UserError, missing_path
from modeling.model_folders import check_weights

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete_checkpoint(folder: str | Path) -> bool:
    """True when `folder/trainer_state.json` exists, parses, and names the folder's own step."""
    folder = Path(folder)
    match = _CHECKPOINT.match(folder.name)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return match is not None and state.get("global_step") == int(match.group(1))


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` under `output_dir` (None if there is none); incomplete ones are logged."""
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
