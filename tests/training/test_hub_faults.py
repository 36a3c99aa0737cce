"""A push that cannot work stops before training with one line naming the fix; a push that fails after training
leaves the saved model in place and gives the command that uploads it later."""

import socket
import subprocess
import sys

import pytest
from huggingface_hub.errors import HTTPError

from cli import UserError
from tests.training.launch import REPO, TIMEOUT_S, script_env, stage1_args
from training import train_qformer

# Slow tier (`make test`, not `make test-fast`): runs the real script.
pytestmark = pytest.mark.slow


def refused_endpoint() -> str:
    """A loopback address where nothing listens: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def push_run(shapes_data, tmp_path, **env) -> subprocess.CompletedProcess:
    args = stage1_args(shapes_data, tmp_path / "q", max_steps=2, push_to_hub=True, hub_model_id="someone/q")
    environment = {key: value for key, value in script_env().items()
                   if key not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT")}
    environment.update(HF_HOME=str(tmp_path / "hf_home"), **env)  # no token stored on this machine either
    return subprocess.run([sys.executable, "-m", "training.train_qformer", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("case", ["unreachable", "no token", "offline"])
def test_a_push_that_cannot_work_stops_before_training(case, shapes_data, tmp_path):
    env = {"unreachable": {"HF_ENDPOINT": refused_endpoint(), "HF_TOKEN": "hf_test"},
           "no token": {"HF_ENDPOINT": refused_endpoint()},
           "offline": {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"}}[case]
    process = push_run(shapes_data, tmp_path, **env)
    assert process.returncode == 2, process.stderr[-3000:]
    [line] = process.stderr.strip().splitlines()
    assert "Traceback" not in process.stdout + process.stderr
    expected = {"unreachable": f"error: --push_to_hub: cannot reach the Hub at {env.get('HF_ENDPOINT')} (",
                "no token": "error: --push_to_hub needs a Hub token: log in with `hf auth login` or set HF_TOKEN",
                "offline": "error: --push_to_hub with HF_HUB_OFFLINE set: unset HF_HUB_OFFLINE to push"}[case]
    assert line.startswith(expected), line
    assert line.endswith("or set --push_to_hub false (the model is then only saved locally; `hf upload` sends it "
                         "later)")
    assert not (tmp_path / "q" / "model.safetensors").exists()


def test_a_push_failing_at_the_end_keeps_the_model_and_gives_the_upload_command(shapes_data, folder_hub, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")

    def network_gone(**kwargs):
        raise HTTPError("connection reset by peer")

    monkeypatch.setattr(folder_hub, "upload_folder", network_gone)
    out = tmp_path / "q"
    with pytest.raises(UserError) as raised:
        train_qformer.main(stage1_args(shapes_data, out, max_steps=2, push_to_hub=True, hub_model_id="someone/q"))
    message = str(raised.value)
    assert message.startswith("uploading to the Hub failed (connection reset by peer); the model is saved in ")
    assert f"send it later with: hf upload someone/q {out} --exclude '_*' 'checkpoint-*' '*.bin'" in message
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
