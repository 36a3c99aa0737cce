"""A Hub token given to a training script is in no file it writes and in nothing it uploads, pushes still
authenticate with it, and no pickle is uploaded."""

import huggingface_hub
import pytest

from tests.training.launch import stage1_args
from training import train_qformer

CANARY = "hf_canaryTOKEN0123456789"


# Slow tier (`make test`, not `make test-fast`): trains through the real script.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("given_in", ["flag", "yaml"])
def test_the_token_reaches_no_file_and_no_upload(given_in, shapes_data, folder_hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # restored after the test: the script sets it
    out = tmp_path / "q"
    args = stage1_args(shapes_data, out, max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True,
                       hub_model_id="someone/q", hub_strategy="checkpoint")
    if given_in == "flag":
        args += ["--hub_token", CANARY]
    else:  # a copy of the YAML with the token in it
        config = tmp_path / "stage1.yaml"
        config.write_text(open(args[0]).read() + f"\nhub_token: {CANARY}\n")
        args[0] = str(config)
    train_qformer.main(args)

    uploaded = folder_hub.uploaded["someone/q"]
    assert "model.safetensors" in uploaded and "last-checkpoint/model.safetensors" in uploaded
    # training_args.bin, optimizer.pt, scheduler.pt, rng_state.pth are written locally, and none is uploaded.
    assert (out / "training_args.bin").is_file() and (out / "checkpoint-1" / "optimizer.pt").is_file()
    pickles = [path for path in uploaded if path.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    assert not pickles, pickles
    written = [path for path in [*out.rglob("*"), *folder_hub.root.rglob("*")] if path.is_file()]
    assert len(written) > 20
    leaking = [str(path) for path in written if CANARY.encode() in path.read_bytes()]
    assert not leaking, leaking
    assert huggingface_hub.get_token() == CANARY  # where the pushes found it
