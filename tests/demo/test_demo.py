"""A reduced `make demo`: the same pipeline on a thousand samples and a hundred steps per stage or fewer, with the
default held-out combinations."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.helpers import REPO, run_isolated

STAGE1 = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
          "i2t_r1_seen", "i2t_r1_held_out", "t2i_r1_seen", "t2i_r1_held_out"]
STAGE2 = ["bleu_4", "cider", "cider_shuffled", "vqa_accuracy", "vqa_accuracy_by_type", "caption_scene_exact",
          "caption_object_f1", "caption_object_recall_seen", "caption_object_recall_held_out", "vqa_accuracy_seen",
          "vqa_accuracy_held_out"]
HOLDOUTS = ["green triangle", "large blue"]  # the demo's default
MIN_HELD_OUT_IMAGES = 8
NOT_REACHED_IN_A_REDUCED_RUN = ("caption_scene_exact", "caption_object_f1", "caption_object_recall_seen",
                                "caption_object_recall_held_out")


# Slow tier (`make test`, not `make test-fast`): runs the demo's pipeline.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # 100 stage-2 steps: enough for every VQA question type to be answered in kind (at 30 the model said yes or no
    # to everything; measured at 30, 100 and 200). 200 stage-1 steps: at 80, R@1 was 0.08-0.21, and of the 24
    # held-out images sometimes none was retrieved first, as untrained; at 200, 0.49 (held out 0.38 / 0.58). 96
    # validation images hold 24 with a held-out combination; the untrained baselines see the first 48 (8 of them).
    cmd = [sys.executable, "-m", "demo", "--out", str(out), "--train", "1000", "--validation", "96",
           "--untrained-eval-samples", "48", "--stage1-steps", "200", "--stage2-steps", "100",
           "--extra", "--per_device_train_batch_size", "32", "--logging_steps", "10", "--max_eval_samples", "48"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_artifact_is_written(demo_out):
    out, stdout = demo_out
    for name in ("report.md", "metrics.json", "captions.csv", "qformer/config.json", "vlm/config.json",
                 "vlm/model.safetensors", "qformer/model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "data" / "train").glob("*.tar")) and list((out / "data" / "validation").glob("*.tar"))
    for picture in ("similarity_grid.png", "captions.png", "captions_held_out.png", "curves.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and min(image.size) >= 200, picture
    report = (out / "report.md").read_text()
    assert "similarity_grid.png" in report and "captions_held_out.png" in report and "| stage 1 | i2t_r1 |" in report
    assert "| stage 1 | t2i_r1_held_out |" in report and "| stage 2 | vqa_accuracy_held_out |" in report
    assert "*green triangle*, *large blue*, which no training image" in report
    assert "on 96 validation images (the untrained baselines on the first 48)" in report
    # Every saved model folder has its card, with the demo's evaluation in it.
    for folder, table in (("qformer", "### Image-text retrieval"), ("vlm", "### Visual question answering"),
                          ("untrained/qformer", "### Image-text retrieval"), ("untrained/vlm", "### Captioning")):
        assert table in (out / folder / "README.md").read_text(), folder
    assert "untrained" in stdout and "wall time" in stdout


def test_metrics_json_has_every_key(demo_out):
    metrics = json.loads((demo_out[0] / "metrics.json").read_text())
    assert set(metrics) == {"stage1", "stage2", "untrained", "wall_seconds", "device", "samples", "holdouts"}
    for block in (metrics, metrics["untrained"]):
        assert list(block["stage1"]) == STAGE1
        assert list(block["stage2"]) == STAGE2
        fractions = {**block["stage1"], **block["stage2"], **block["stage2"]["vqa_accuracy_by_type"]}
        for key in ("bleu_4", "cider", "cider_shuffled", "vqa_accuracy_by_type"):  # CIDEr goes up to 10
            del fractions[key]
        assert all(0.0 <= value <= 1.0 for value in fractions.values()), fractions
        assert {"color", "count"} <= set(block["stage2"]["vqa_accuracy_by_type"])
    assert metrics["samples"] == {"train": 1000, "validation": 96, "untrained_validation": 48}
    assert metrics["holdouts"] == HOLDOUTS
    assert metrics["wall_seconds"] > 0 and "cpu" in metrics["device"]


def test_held_out_scores_rest_on_enough_samples(demo_out):
    # The validation scenes must hold enough of the held-out combinations for their scores to mean something.
    for folder in ("eval", "untrained/eval"):
        qformer = json.loads((demo_out[0] / folder / "qformer" / "metrics.json").read_text())
        vlm = json.loads((demo_out[0] / folder / "vlm" / "metrics.json").read_text())
        assert qformer["meta"]["holdouts"] == vlm["meta"]["holdouts"] == HOLDOUTS
        # Stage 1 is scored on the captions it trains on (configs/tiny/stage1.yaml), stage 2 on the data's own.
        assert qformer["meta"]["caption_column"] == "caption_color_first" and "caption_column" not in vlm["meta"]
        assert qformer["retrieval"]["held_out"]["num_images"] >= MIN_HELD_OUT_IMAGES
        assert vlm["caption_scene"]["objects_held_out"] >= MIN_HELD_OUT_IMAGES
        assert vlm["vqa"]["held_out"]["num_questions"] >= 2 * MIN_HELD_OUT_IMAGES


def _reported_numbers(block: dict) -> dict[str, float]:
    """Every number of one block of metrics.json (stage1 and stage2), VQA per type flattened to `vqa <type>`."""
    numbers = {}
    for stage in ("stage1", "stage2"):
        for key, value in block[stage].items():
            numbers |= {f"vqa {kind}": v for kind, v in value.items()} if isinstance(value, dict) else {key: value}
    return numbers


def test_trained_beats_untrained(demo_out):
    out, _ = demo_out
    metrics = json.loads((out / "metrics.json").read_text())
    trained, untrained = _reported_numbers(metrics), _reported_numbers(metrics["untrained"])
    assert set(trained) == set(untrained)
    # cider_shuffled is a control, not a score to raise: a trained model earns some CIDEr from the caption template
    # alone. What it must show is that the trained model reads the picture: right images beat shuffled ones.
    assert trained["cider"] > trained.pop("cider_shuffled")
    untrained.pop("cider_shuffled")
    # Whole objects named right in place (shape, colour, size and cell) take the full demo's hundreds of steps on
    # thousands of images: after 100 steps a caption has the right grammar and about one object in a hundred
    # exactly right, and none of a combination never seen in training. These only must not fall below untrained.
    for key in NOT_REACHED_IN_A_REDUCED_RUN:
        assert trained.pop(key) >= untrained.pop(key), key
    not_better = {key: (untrained[key], value) for key, value in trained.items() if not value > untrained[key]}
    assert not not_better, f"trained <= untrained on (untrained, trained): {not_better}"

    # Stage-2 loss on the same validation conversations, untrained vs trained.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling  # noqa: F401
    from data.loading import load_image_text_dataset
    from training.conversation_collator import ConversationCollator

    rows = load_image_text_dataset(out / "data", split="validation").select(range(32))
    losses = {}
    for name, folder in (("untrained", out / "untrained" / "vlm"), ("trained", out / "vlm")):
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        batch = ConversationCollator(AutoProcessor.from_pretrained(folder), max_length=96)(list(rows))
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
