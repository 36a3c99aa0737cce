"""Shared test utilities: tiny models built from configs, and a Python process that cannot see this repository."""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import Future
from pathlib import Path

import huggingface_hub
from huggingface_hub import CommitOperationAdd, HfApi, RepoUrl

REPO = Path(__file__).resolve().parents[1]

# Prepended to code run by `run_isolated`: any import of this project's packages fails, as on a machine that only has
# the saved folder. The check at the end proves the block is in force.
_ISOLATION_PRELUDE = """
import importlib.abc, sys
class _BlockProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"modeling", "training", "data", "eval"}:
            raise ImportError(f"{name} is not importable in this isolated process")
sys.meta_path.insert(0, _BlockProject())
try:
    import modeling
except ImportError:
    pass
else:
    raise SystemExit("isolation failed: the project is importable")
"""


def run_isolated(code: str, cwd: Path, timeout: int = 300) -> str:
    """Runs `code` in a fresh interpreter, in `cwd`, offline, unable to import this project; returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_MODULES_CACHE=str(cwd / "hf_modules"))
    script = _ISOLATION_PRELUDE + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"isolated process failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


TINY_CORPUS = [
    "a small red circle in the top left and a large blue square in the center",
    "a large green triangle in the bottom right",
    "two shapes: a yellow circle on the left and a purple square on the right",
    "what color is the circle?",
    "how many shapes are there?",
    "is there a triangle?",
    "where is the square?",
    "describe the image.",
    "red", "green", "blue", "yellow", "purple", "orange", "one", "two", "three", "yes", "no",
    "top left", "middle center", "bottom right",
]

TINY_LM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2}


class FolderHub(HfApi):
    """The network boundary: repositories are folders, commits copy their files there and are recorded."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        self.uploaded: dict[str, list[str]] = {}

    def whoami(self, token=None):
        # What the Hub answers for a valid token (the training scripts ask before training).
        return {"type": "user", "name": "someone"}

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"{huggingface_hub.constants.ENDPOINT}/{repo_id}")

    def _validate_yaml(self, content, repo_type=None, token=None):
        # The Hub checks a model card's metadata before an upload_folder; here its YAML must at least parse.
        huggingface_hub.ModelCard(content, ignore_metadata_errors=False)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None,
                      run_as_future=False, **kwargs):
        # huggingface_hub's own choice of files (patterns, the card check), committed here without the network.
        additions = self._prepare_upload_folder_additions(
            folder_path, path_in_repo or "", allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
            repo_type=None, token=None,
        )
        self.create_commit(repo_id, additions)
        if run_as_future:  # the Trainer's pushes during training wait on a future
            done = Future()
            done.set_result(None)
            return done
        return None

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            assert isinstance(op, CommitOperationAdd), op
            target = self.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(op.path_or_fileobj).read_bytes())
            self.uploaded.setdefault(repo_id, []).append(op.path_in_repo)
        return None
