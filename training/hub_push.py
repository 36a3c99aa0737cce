"""`--push_to_hub` without surprises: checked before training, and a push that fails at the end loses nothing.

The Trainer creates the Hub repository in its constructor, so no network or no token used to end the run there in
a stack of library frames; a push that failed after training ended it the same way, with no word that the model was
saved. `check_push` asks the Hub who the token belongs to before anything is loaded and stops with one line naming
the fix; `push_or_explain` turns a failed final push into one line giving the saved folder and the command that
uploads it later. Both go through transformers' Hub client (`transformers.utils.hub.hf_api`), which the Trainer's
pushes use.
"""

import shlex

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled
from transformers import Trainer, TrainingArguments
from transformers.utils import hub as transformers_hub

from cli import UserError, one_line

from .trainer import LOCAL_ONLY_PATTERNS

# How the Hub client reports trouble: the network's errors (httpx's, which are not OSErrors), the Hub's HTTP
# answers (OSErrors), offline mode (a ConnectionError).
HUB_ERRORS = (HTTPError, OSError)
OFF_SWITCH = "or set --push_to_hub false (the model is then only saved locally; `hf upload` sends it later)"
# What the Trainer's own final push leaves out (transformers.Trainer.push_to_hub), for the command that replaces it.
TRAINER_PUSH_IGNORES = ["_*", "checkpoint-*"]


def check_push(training_args: TrainingArguments) -> None:
    """Raises `UserError` when `push_to_hub` is set and a push cannot work: offline mode, no token, a token the Hub
    refuses, or a Hub that cannot be reached."""
    if not training_args.push_to_hub:
        return
    endpoint = huggingface_hub.constants.ENDPOINT
    if huggingface_hub.get_token() is None:
        raise UserError(f"--push_to_hub needs a Hub token: log in with `hf auth login` or set HF_TOKEN, {OFF_SWITCH}")
    try:
        transformers_hub.hf_api().whoami()
    except OfflineModeIsEnabled:
        raise UserError(f"--push_to_hub with HF_HUB_OFFLINE set: unset HF_HUB_OFFLINE to push, {OFF_SWITCH}") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status == 401:
            raise UserError(f"--push_to_hub: the Hub at {endpoint} refused the token (401); log in again with `hf "
                            f"auth login` or set HF_TOKEN to a valid token, {OFF_SWITCH}") from None
        raise UserError(f"--push_to_hub: the Hub at {endpoint} answered {one_line(err)}; {OFF_SWITCH}") from None
    except HUB_ERRORS as err:
        raise UserError(f"--push_to_hub: cannot reach the Hub at {endpoint} ({one_line(err)}); check the network "
                        f"(and HF_ENDPOINT), {OFF_SWITCH}") from None


def upload_command(training_args: TrainingArguments) -> str:
    """The `hf upload` command that sends the saved output folder, without what the Trainer's push leaves out and
    what our pushes leave out (`training.trainer.LOCAL_ONLY_PATTERNS`)."""
    repo = training_args.hub_model_id or "<your-name>/<repo>"
    return shlex.join(["hf", "upload", repo, str(training_args.output_dir), "--exclude", *TRAINER_PUSH_IGNORES,
                       *LOCAL_ONLY_PATTERNS])


def push_or_explain(trainer: Trainer, training_args: TrainingArguments) -> None:
    """The final `trainer.push_to_hub()`; when it fails, a `UserError` saying the model is saved and how to send it."""
    try:
        trainer.push_to_hub()
    except HUB_ERRORS as err:
        raise UserError(f"uploading to the Hub failed ({one_line(err)}); the model is saved in "
                        f"{training_args.output_dir}; send it later with: {upload_command(training_args)}"
                        ) from err


__all__ = ["check_push", "push_or_explain", "upload_command"]
