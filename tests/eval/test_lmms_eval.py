"""The released lmms-eval runs a saved VLM on the exported shapes tasks and answers exactly as `python -m eval` does."""

import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from data.synthetic import write_split
from eval.__main__ import main as eval_main
from eval.lmms_tasks.export import CAPTION_TASK, VQA_TASK, export_tasks
from tests.conftest import tiny_vlm_and_processor
from tests.helpers import REPO

# Slow tier (`make test`, not `make test-fast`): runs the released lmms-eval.
pytestmark = pytest.mark.slow


def test_processor_ignores_empty_videos_and_audio_and_refuses_real_ones(tiny_vlm, shape_images):
    _, processor = tiny_vlm
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image."}]}],
        add_generation_prompt=True, tokenize=False,
    )
    plain = processor(images=shape_images[:1], text=[prompt], return_tensors="pt")
    for extra in ({"videos": [], "audios": []}, {"videos": None, "audio": None, "audios": None}, {"audio": []}):
        inputs = processor(images=shape_images[:1], text=[prompt], return_tensors="pt", **extra)
        assert inputs.keys() == plain.keys()
        assert all(torch.equal(inputs[k], plain[k]) for k in plain)
    for name in ("videos", "audio", "audios"):
        with pytest.raises(ValueError, match=f"takes images and text only, but got 1 {name}"):
            processor(images=shape_images[:1], text=[prompt], return_tensors="pt", **{name: [shape_images[0]]})


def test_processor_pads_on_the_left_unless_told(tiny_vlm, shape_images):
    _, processor = tiny_vlm
    texts = ["<image>red", "<image>what color is the circle?"]
    pad = processor.tokenizer.pad_token_id
    left = processor(images=shape_images[:2], text=texts, padding=True, return_tensors="pt")["input_ids"]
    right = processor(images=shape_images[:2], text=texts, padding=True, padding_side="right",
                      return_tensors="pt")["input_ids"]
    assert left[0, 0] == pad and left[0, -1] != pad
    assert right[0, 0] != pad and right[0, -1] == pad
    assert processor.tokenizer.padding_side == "right"  # the tokenizer's own setting (the collator's) is untouched


@pytest.fixture(scope="module")
def bf16_vlm(tmp_path_factory):
    """A saved tiny VLM in bfloat16 (lmms-eval's huggingface model always loads in bfloat16; `python -m eval` keeps
    the saved dtype), with spread weights and only whole words or the end of the turn allowed out, so that its
    answers differ between questions and a wrong prompt, image or decoding shows. Its Q-Former reads the question
    (instruction_aware_qformer): lmms-eval renders the saved chat template and passes the processor's outputs on,
    the Q-Former's ids included, and must ask the way training did."""
    model, processor = tiny_vlm_and_processor(instruction_aware_qformer=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in [*model.language_model.parameters(), *model.qformer.query_transformer.parameters()]:
            if param.dim() > 1:
                param.normal_(std=0.3)
    tokenizer = processor.tokenizer
    words = {i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().isalpha()}
    model.generation_config.suppress_tokens = sorted(set(range(len(tokenizer))) - words - {tokenizer.eos_token_id})
    folder = tmp_path_factory.mktemp("vlm")
    model.to(torch.bfloat16).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                    reason="lmms-eval is not installed; install it as the README's lmms-eval section says")
def test_lmms_eval_answers_as_python_m_eval_does(bf16_vlm, tmp_path):
    write_split(tmp_path / "shapes", "validation", 2, image_size=32, samples_per_shard=2, num_proc=1)
    written = export_tasks(str(tmp_path / "shapes"), tmp_path / "tasks", split="validation")
    assert written[CAPTION_TASK] == 2 and 8 <= written[VQA_TASK] <= 20

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "datasets")}
    # Both in the same left-padded batches of 4: in bfloat16 another batch shape can flip a near-tie, but a prompt
    # padded on the other side changes the answer.
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "huggingface",
           "--model_args", f"pretrained={bf16_vlm},trust_remote_code=True,device=cpu,device_map=cpu",
           "--include_path", str(tmp_path / "tasks"), "--tasks", f"{VQA_TASK},{CAPTION_TASK}", "--batch_size", "4",
           "--log_samples", "--output_path", str(tmp_path / "lmms")]
    lmms = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # python -m eval runs meanwhile, in this process
        metrics = eval_main(["--model", str(bf16_vlm), "--data", str(tmp_path / "shapes"), "--split", "validation",
                             "--out", str(tmp_path / "eval"), "--batch-size", "4", "--no-shuffled", "--meteor", "off"])
    finally:
        log, _ = lmms.communicate(timeout=600)
    # lmms-eval logs a failed evaluation and still exits 0: its results file is the proof it ran.
    assert lmms.returncode == 0, log[-4000:]
    results = list((tmp_path / "lmms").rglob("*_results.json"))
    assert len(results) == 1, log[-4000:]

    def lmms_predictions(task: str) -> list[str]:
        (samples,) = (tmp_path / "lmms").rglob(f"*_samples_{task}.jsonl")
        rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
        return [row["filtered_resps"].strip() for row in rows]

    with open(tmp_path / "eval" / "vqa.csv", newline="", encoding="utf-8") as f:
        eval_answers = [row["prediction"] for row in csv.DictReader(f)]
    with open(tmp_path / "eval" / "captions.csv", newline="", encoding="utf-8") as f:
        eval_captions = [row["generated"] for row in csv.DictReader(f)]
    assert lmms_predictions(VQA_TASK) == eval_answers
    assert lmms_predictions(CAPTION_TASK) == eval_captions
    assert len(set(eval_answers)) > len(eval_answers) // 2 and all(eval_captions)  # words came out, and they vary

    scores = json.loads(results[0].read_text())["results"]
    assert scores[VQA_TASK]["accuracy,none"] == pytest.approx(metrics["vqa"]["accuracy"])
    assert scores[VQA_TASK]["exact_match,none"] == pytest.approx(metrics["vqa"]["exact_match"])
    assert scores[CAPTION_TASK]["cider,none"] == pytest.approx(metrics["captioning"]["cider"])
