"""Common mistakes on every command line end as one line on stderr that names the bad value and the fix.

Each case runs the real command (`python -m module args`, as a user types it) in a process of its own and checks:
exit status 2, exactly one line on stderr starting with "error:", no traceback anywhere, and the words that name
the bad thing. Each case is mostly the import of torch and transformers, so the cases are forked two at a time from
one interpreter that has imported those once (forked_commands.py), and what that import printed is checked to be
nothing; the tests then read the results.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from data.synthetic import generate_dataset
from tests.conftest import tiny_qformer_and_processor, tiny_vlm_and_processor
from tests.helpers import REPO

STAGE1, STAGE2 = "configs/tiny/stage1.yaml", "configs/tiny/stage2.yaml"
PROGRESS_BAR = re.compile(r"\d+%\|.*\| \d+/\d+ ")
# What `_world` makes, by name.
WORLD = ("shapes", "qformer", "vlm", "llama", "truncated", "no_weights", "foreign", "empty", "garbage.parquet",
         "captions", "run", "syntax.yaml", "types.yaml", "unknown.yaml", "cycle.yaml", "llava.json", "vqa.parquet",
         "no_model.yaml", "vision_only.yaml", "pretrained_lm.yaml")


# Slow tier (`make test`, not `make test-fast`): runs each command in a child process.
pytestmark = pytest.mark.slow


def _world(root: Path) -> dict[str, str]:
    """Everything the cases point at: data, model folders good and broken, bad config files."""
    generate_dataset(root / "shapes", {"train": 16, "validation": 8}, seed=1, image_size=32, samples_per_shard=8,
                     num_proc=1)
    qformer, processor = tiny_qformer_and_processor()
    qformer.save_pretrained(root / "qformer")
    processor.save_pretrained(root / "qformer")
    vlm, processor = tiny_vlm_and_processor()
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(root / "llama")
    shutil.copytree(root / "qformer", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "qformer", root / "no_weights")
    (root / "no_weights" / "model.safetensors").unlink()
    # A VLM saved by other model code: one weight this checkout's classes have no parameter for.
    shutil.copytree(root / "vlm", root / "foreign")
    weights = load_file(root / "foreign" / "model.safetensors")
    save_file({**weights, "model.adapter.query_bias": torch.zeros(4)}, root / "foreign" / "model.safetensors",
              metadata={"format": "pt"})
    (root / "empty").mkdir()
    (root / "garbage.parquet").write_bytes(os.urandom(2048))
    # Captions only: no counterfactual captions, no question-answer pairs (the imagefolder convention).
    (root / "captions").mkdir()
    with open(root / "captions" / "metadata.jsonl", "w") as f:
        for i in range(6):
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / "captions" / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}) + "\n")
    # Conversation data: LLaVA JSON naming its image relative to a folder; VQA columns with ten answers per question.
    (root / "llava.json").write_text(json.dumps([{"id": "0", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is it?"}, {"from": "gpt", "value": "blue"}]}]))
    Dataset.from_dict({"image": [{"bytes": (root / "captions" / "0.png").read_bytes(), "path": None}],
                       "question": ["what color is it?"], "answers": [["blue"] * 10]},
                      features=Features({"image": ImageFeature(), "question": Value("string"),
                                         "answers": List(Value("string"))})).to_parquet(str(root / "vqa.parquet"))
    (root / "run" / "checkpoint-7").mkdir(parents=True)  # a save that died before trainer_state.json
    (root / "syntax.yaml").write_text("train_data: x\nmax_steps: 5\n  learning_rate: 0.1\n")  # indented
    (root / "types.yaml").write_text("train_data: x\nnum_query_tokens: many\n")
    (root / "cycle.yaml").write_text("max_steps: 5\nextends: cycle.yaml\n")
    (root / "unknown.yaml").write_text("train_data: x\nnum_querys: 4\n")
    (root / "no_model.yaml").write_text("max_steps: 5\n")  # neither preset: tiny nor a checkpoint
    (root / "vision_only.yaml").write_text(f"vision_model_name_or_path: {root / 'qformer'}\n")
    (root / "pretrained_lm.yaml").write_text(f"language_model_name_or_path: {root / 'llama'}\n")
    return {name: str(root / name) for name in WORLD}


def _cases(w: dict[str, str], out: str) -> dict[str, tuple[list[str], list[str]]]:
    """`{case: (command after python -m, words the error line must hold)}`."""
    data = ["--train_data", w["shapes"], "--eval_data", w["shapes"], "--output_dir", f"{out}/o"]
    q, v = ["-m", "training.train_qformer"], ["-m", "training.train_vlm"]
    v_args = [STAGE2, *data, "--qformer_name_or_path", w["qformer"]]
    evaluate = ["-m", "eval", "--out", f"{out}/e"]
    return {
        "missing config file": ([*q, "configs/tiny/stage9.yaml"], ["configs/tiny/stage9.yaml", "not found"]),
        "yaml syntax": ([*q, w["syntax.yaml"]], [f"{w['syntax.yaml']} line 3", "not valid YAML"]),
        "yaml type": ([*q, w["types.yaml"]], [f"{w['types.yaml']} line 2", "num_query_tokens", "integer", "many"]),
        "yaml unknown field": ([*q, w["unknown.yaml"]], ["line 2", "'num_querys'", "did you mean num_query_tokens"]),
        "unknown option": ([*q, STAGE1, *data, "--max_step", "5"], ["--max_step", "did you mean --max_steps"]),
        "option type": ([*q, STAGE1, *data, "--max_steps", "ten"], ["--max_steps", "ten"]),
        "option choice": ([*q, STAGE1, *data, "--itc_similarity", "median"], ["--itc_similarity", "median"]),
        "bad JSON option": ([*q, STAGE1, *data, "--vision_config", "{layers: 2"], ["vision_config", "JSON"]),
        "zero batch": ([*q, STAGE1, *data, "--per_device_train_batch_size", "0"],
                       ["per_device_train_batch_size", "at least 1", "0"]),
        "negative sample count": ([*q, STAGE1, *data, "--max_train_samples", "-1"], ["max_train_samples", "-1"]),
        "zero queries": ([*q, STAGE1, *data, "--num_query_tokens", "0"], ["num_query_tokens", "at least 1"]),
        "more regional queries than the preset's": ([*q, STAGE1, *data, "--regional_queries", "5"],
                                                    ["regional_queries 5", "num_query_tokens (16)"]),
        "isolated regional queries turned off": ([*q, STAGE1, *data, "--regional_queries", "0"],
                                                 ["isolate_regional_queries needs regional_queries",
                                                  "set isolate_regional_queries false"]),
        "one pretrained encoder": ([*q, w["vision_only.yaml"], *data], ["--text_model_name_or_path"]),
        "streaming without max_steps": ([*q, STAGE1, *data, "--streaming", "true", "--max_steps", "-1"],
                                        ["streaming: true needs max_steps", "--max_steps"]),
        "no model named": ([*q, w["no_model.yaml"], *data], ["no model named", "preset: tiny", "model_name_or_path"]),
        "the tiny preset beside a pretrained LM": ([*v, *v_args, "--language_model_name_or_path", w["llama"]],
                                                   ["preset: tiny", "language_model_name_or_path", "leave out one"]),
        "a tiny setting beside a pretrained LM": (
            [*v, w["pretrained_lm.yaml"], *data, "--qformer_name_or_path", w["qformer"], "--lm_vocab_size", "500"],
            ["lm_vocab_size", "tiny preset", "not read beside language_model_name_or_path"]),
        "data path typo": ([*q, STAGE1, *data, "--train_data", w["shapes"] + "x"],
                           [w["shapes"] + "x", "no such file or folder", f"did you mean {w['shapes']}"]),
        "empty data folder": ([*q, STAGE1, *data, "--train_data", w["empty"]], [w["empty"], "is empty"]),
        "unreadable data file": ([*q, STAGE1, *data, "--train_data", w["garbage.parquet"]],
                                 [w["garbage.parquet"], "cannot read"]),
        # The tiny stage 1 reads the shapes data's "size colour shape" captions (caption_column in its YAML).
        "the tiny stage 1 on data without its caption column": (
            [*q, STAGE1, *data, "--train_data", w["captions"]],
            ["caption column 'caption_color_first' not found", "columns are: image, text"]),
        "hard negatives without negatives": ([*q, *data, "--preset", "tiny", "--train_data", w["captions"],
                                              "--hard_negatives", "2"],
                                             ["hard_negatives: 2", "negative_captions", "hard_negatives: 0"]),
        "no checkpoint to resume": ([*q, STAGE1, *data, "--resume_from_checkpoint", "true", "--output_dir",
                                     f"{out}/fresh"], ["--resume_from_checkpoint", "no complete checkpoint",
                                                       f"{out}/fresh"]),
        "incomplete checkpoint": ([*q, STAGE1, *data, "--resume_from_checkpoint", f"{w['run']}/checkpoint-7"],
                                  [f"{w['run']}/checkpoint-7", "not a complete checkpoint"]),
        "q-former path typo": ([*v, *v_args, "--qformer_name_or_path", w["qformer"][:-1]],
                               ["--qformer_name_or_path", "no such file or folder", f"did you mean {w['qformer']}"]),
        "a VLM as the Q-Former": ([*v, *v_args, "--qformer_name_or_path", w["vlm"]],
                                  [w["vlm"], "is a stage-2 VLM", "not a stage-1 Q-Former", "train_qformer"]),
        "a Q-Former as the VLM": ([*v, *v_args, "--model_name_or_path", w["qformer"]],
                                  [w["qformer"], "is a stage-1 Q-Former", "not a stage-2 VLM"]),
        "another architecture": ([*v, *v_args, "--qformer_name_or_path", w["llama"]], [w["llama"], "'llama' model"]),
        "truncated weights": ([*v, *v_args, "--qformer_name_or_path", w["truncated"]],
                              [f"{w['truncated']}/model.safetensors", "truncated or corrupt"]),
        "missing weights": ([*v, *v_args, "--qformer_name_or_path", w["no_weights"]],
                            [f"{w['no_weights']}/model.safetensors", "missing"]),
        "a yaml that extends itself": ([*q, w["cycle.yaml"]], [f"{w['cycle.yaml']} line 2", "break the cycle"]),
        "decay longer than the run": ([*v, *v_args, "--max_steps", "100", "--lr_scheduler_type", "warmup_stable_decay",
                                       "--lr_scheduler_kwargs", '{"num_decay_steps": 200}'],
                                      ["num_decay_steps 200", "max_steps 100", "at most 70"]),
        "decay steps missing": ([*v, *v_args, "--lr_scheduler_type", "warmup_stable_decay"],
                                ["warmup_stable_decay", "num_decay_steps"]),
        "question turns without questions": ([*v, *v_args, "--train_data", w["captions"]],
                                             ["qa_turns: 5", "qa_turns: 0"]),
        "conversation format typo": ([*v, *v_args, "--data_format", "lava"], ["--data_format", "lava"]),
        "LLaVA data without its image folder": ([*v, *v_args, "--train_data", w["llava.json"]],
                                                ["relative paths", "'0.png'", "--image_folder"]),
        "VQA answer column typo": ([*v, *v_args, "--train_data", w["vqa.parquet"], "--answer_column", "answer"],
                                   ["answer column 'answer' not found", "did you mean answers", "--answer_column"]),
        "ratings not name=value": ([*v, *v_args, "--min_ratings", "relevance"],
                                   ["min_ratings", "'relevance'", "relevance=3"]),
        "eval model typo": ([*evaluate, "--model", w["vlm"] + "2", "--data", w["shapes"]],
                            ["--model", "no such file or folder", f"did you mean {w['vlm']}"]),
        "eval a model saved by other code": ([*evaluate, "--model", w["foreign"], "--data", w["shapes"], "--split",
                                              "validation"],
                                             [w["foreign"], "unexpected: model.adapter.query_bias",
                                              "other model code"]),
        "eval another architecture": ([*evaluate, "--model", w["llama"], "--data", w["shapes"]], ["'llama' model"]),
        "eval empty data": ([*evaluate, "--model", w["qformer"], "--data", w["empty"]], [w["empty"], "is empty"]),
        "eval zero samples": ([*evaluate, "--model", w["qformer"], "--data", w["shapes"], "--max-samples", "0"],
                              ["--max-samples", "at least 1"]),
        "eval missing trainer state": ([*evaluate, "--model", w["qformer"], "--data", w["shapes"], "--split",
                                        "validation", "--trainer-state", f"{out}/state.json"],
                                       ["--trainer-state", f"{out}/state.json"]),
        "negative sample count to generate": (["-m", "data.synthetic", "--out", f"{out}/s", "--train", "-5"],
                                              ["--train", "at least 0", "-5"]),
        "nothing to generate": (["-m", "data.synthetic", "--out", f"{out}/s", "--train", "0", "--validation", "0"],
                                ["0 samples"]),
        "missing URL list": (["-m", "data.download", "--url-list", f"{out}/urls.parquet", "--output-folder",
                              f"{out}/d"], [f"{out}/urls.parquet", "data.conceptual_captions"]),
        "zero download processes": (["-m", "data.download", "--url-list", "x.parquet", "--output-folder", "d",
                                     "--processes", "0"], ["--processes", "at least 1"]),
        "unreadable URL source": (["-m", "data.conceptual_captions", "--source", w["garbage.parquet"], "--output",
                                   f"{out}/cc.parquet"], [w["garbage.parquet"], "cannot read"]),
        "feature cache without a stage": (["-m", "training.feature_cache", STAGE1], ["qformer or vlm"]),
        "feature cache without a folder": (["-m", "training.feature_cache", "qformer", STAGE1, *data],
                                           ["--feature_cache"]),
        "demo zero samples": (["-m", "demo", "--out", f"{out}/demo", "--train", "0"], ["--train", "at least 1"]),
        "demo config typo": (["-m", "demo", "--out", f"{out}/demo", "--stage2-config", "configs/tiny/stage3.yaml"],
                             ["configs/tiny/stage3.yaml", "not found"]),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistakes")
    torch.manual_seed(0)
    out = str(root / "out")
    # Each case its own output folder: two cases run at once, and a run takes a lock on its output_dir.
    cases = {name: ([f"{arg}{i}" if arg == f"{out}/o" else arg for arg in command], words)
             for i, (name, (command, words)) in enumerate(_cases(_world(root / "world"), out).items())}
    (root / "spec.json").write_text(json.dumps({name: command for name, (command, _) in cases.items()}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("QFORMER_VLM_DEBUG", None)
    runner = Path(__file__).with_name("forked_commands.py")
    subprocess.run([sys.executable, str(runner), str(root / "spec.json"), str(root / "results.json")], cwd=REPO,
                   env=env, check=True, timeout=900)
    found = json.loads((root / "results.json").read_text())
    assert found["imports"] == {"stdout": "", "stderr": ""}, found["imports"]
    return {name: (SimpleNamespace(**found["commands"][name]), words) for name, (_, words) in cases.items()}


CASE_NAMES = list(_cases(dict(zip(WORLD, WORLD)), "out"))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_a_mistake_is_one_line_naming_the_bad_value(results, case):
    run, words = results[case]
    output = f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stdout + run.stderr, output
    assert run.returncode == 2, output
    # Progress bars (model loading) may come before it; any other line on stderr would be noise around the error.
    lines = [line for line in run.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def test_the_traceback_is_there_when_asked_for(tmp_path):
    command = ["-m", "training.train_qformer", "configs/tiny/stage9.yaml"]
    env = {**os.environ, "QFORMER_VLM_DEBUG": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" in run.stderr and "UserError" in run.stderr
