"""push_to_hub runs its real code path; only the Hub's HTTP API is replaced by a local folder."""

from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import CommitOperationAdd, HfApi, RepoUrl
from safetensors.torch import load_file

from tests.helpers import run_isolated


class FolderHub(HfApi):
    """The network boundary: repositories are folders, commits copy their files there and are recorded."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root
        self.uploaded: dict[str, list[str]] = {}

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl(f"{huggingface_hub.constants.ENDPOINT}/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            assert isinstance(op, CommitOperationAdd), op
            target = self.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(op.path_or_fileobj).read_bytes())
            self.uploaded.setdefault(repo_id, []).append(op.path_in_repo)
        return None


@pytest.fixture
def folder_hub(tmp_path, monkeypatch):
    hub = FolderHub(tmp_path / "hub")
    monkeypatch.setattr(transformers_hub, "_hf_api", hub)
    # The model-card lookup must not reach for the network either: offline, a missing card is made from a template.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub


def test_pushed_files_are_exactly_what_a_fresh_process_needs(tiny_vlm, shape_images, folder_hub, tmp_path):
    model, processor = tiny_vlm
    repo = "someone/tiny-vlm"
    model.push_to_hub(repo)
    processor.push_to_hub(repo)

    uploaded = set(folder_hub.uploaded[repo])
    expected = {
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "configuration_qformer.py", "configuration_vlm.py", "modeling_qformer.py", "modeling_vlm.py",
        "qformer_losses.py", "processing_vlm.py", "qformer_tokenizer/tokenizer.json",
        "qformer_tokenizer/tokenizer_config.json", "processor_config.json", "chat_template.jinja", "tokenizer.json",
        "tokenizer_config.json",
    }
    assert uploaded == expected
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in uploaded)

    # The uploaded files alone, and nothing else, are enough for the Auto classes in an isolated process.
    model.eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=shape_images[:1], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        expected_logits = model(**inputs).logits
    shape_images[0].save(tmp_path / "image.png")
    run_isolated(
        f"""
        import torch
        from PIL import Image
        from safetensors.torch import save_file
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = "hub/{repo}"
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(images=[Image.open("image.png")], text=[{prompt!r}], return_tensors="pt")
        with torch.no_grad():
            save_file({{"logits": model(**inputs).logits}}, "logits.safetensors")
        """,
        cwd=tmp_path,
    )
    torch.testing.assert_close(load_file(tmp_path / "logits.safetensors")["logits"], expected_logits, atol=1e-6, rtol=0)
