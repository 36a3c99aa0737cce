"""A reduced `make demo`: the same pipeline on a few hundred samples and a few dozen steps."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.helpers import REPO, run_isolated

STAGE1 = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
STAGE2 = ["bleu_4", "cider", "cider_shuffled", "vqa_accuracy", "vqa_accuracy_by_type", "caption_scene_exact",
          "caption_object_f1"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "demo", "--out", str(out), "--train", "400", "--validation", "48",
           "--stage1-steps", "40", "--stage2-steps", "30", "--extra", "--per_device_train_batch_size", "32",
           "--logging_steps", "10", "--max_eval_samples", "48"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_artifact_is_written(demo_out):
    out, stdout = demo_out
    for name in ("report.md", "metrics.json", "captions.csv", "qformer/config.json", "vlm/config.json",
                 "vlm/model.safetensors", "qformer/model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "data" / "train").glob("*.tar")) and list((out / "data" / "validation").glob("*.tar"))
    for picture in ("similarity_grid.png", "captions.png", "curves.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and min(image.size) >= 200, picture
    report = (out / "report.md").read_text()
    assert "similarity_grid.png" in report and "| stage 1 | i2t_r1 |" in report
    # Every saved model folder has its card, with the demo's evaluation in it.
    for folder, table in (("qformer", "### Image-text retrieval"), ("vlm", "### Visual question answering"),
                          ("untrained/qformer", "### Image-text retrieval"), ("untrained/vlm", "### Captioning")):
        assert table in (out / folder / "README.md").read_text(), folder
    assert "untrained" in stdout and "wall time" in stdout


def test_metrics_json_has_every_key(demo_out):
    metrics = json.loads((demo_out[0] / "metrics.json").read_text())
    assert set(metrics) == {"stage1", "stage2", "untrained", "wall_seconds", "device", "samples"}
    for block in (metrics, metrics["untrained"]):
        assert set(block["stage1"]) == set(STAGE1)
        assert set(block["stage2"]) == set(STAGE2)
        for key in STAGE1 + ["vqa_accuracy", "caption_scene_exact", "caption_object_f1"]:
            value = block["stage1"].get(key, block["stage2"].get(key))
            assert 0.0 <= value <= 1.0, key
        assert {"color", "count"} <= set(block["stage2"]["vqa_accuracy_by_type"])
    assert metrics["samples"] == {"train": 400, "validation": 48}
    assert metrics["wall_seconds"] > 0 and "cpu" in metrics["device"]


def test_trained_beats_untrained(demo_out):
    out, _ = demo_out
    metrics = json.loads((out / "metrics.json").read_text())
    assert sum(metrics["stage1"].values()) > sum(metrics["untrained"]["stage1"].values())

    # Stage-2 loss on the same validation conversations, untrained vs trained.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling  # noqa: F401
    from data.loading import load_image_text_dataset
    from training.collators import CaptioningCollator

    rows = load_image_text_dataset(out / "data", split="validation").select(range(32))
    losses = {}
    for name, folder in (("untrained", out / "untrained" / "vlm"), ("trained", out / "vlm")):
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        batch = CaptioningCollator(AutoProcessor.from_pretrained(folder), max_length=96)(list(rows))
        with torch.no_grad():
            losses[name] = model(**batch).loss.item()
    assert losses["trained"] < losses["untrained"] - 1.0, losses


def test_saved_folders_load_in_a_fresh_process(demo_out):
    out, _ = demo_out
    stdout = run_isolated(
        f"""
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
        q = AutoModel.from_pretrained("{out / 'qformer'}", trust_remote_code=True)
        qp = AutoProcessor.from_pretrained("{out / 'qformer'}", trust_remote_code=True)
        v = AutoModelForImageTextToText.from_pretrained("{out / 'vlm'}", trust_remote_code=True)
        vp = AutoProcessor.from_pretrained("{out / 'vlm'}", trust_remote_code=True)
        print(type(q).__name__, type(qp).__name__, type(v).__name__, type(vp).__name__)
        """,
        cwd=out,
    )
    assert stdout.split() == ["QFormerModel", "BlipProcessor", "VLMForConditionalGeneration", "VLMProcessor"]
