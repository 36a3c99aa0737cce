"""`make demo`: train a VLM from nothing on the offline shapes set, on a laptop CPU, and show that it learned to see.

Steps: generate the data; evaluate untrained models; train stage 1 and stage 2 with the same entry points and
configs users run on GPUs (configs/tiny/*.yaml); evaluate the trained models (captions are also scored against the
drawn scene, and against shuffled images); write outputs/demo/ (models, report.md, pictures, metrics.json) and
print a table.

    python -m training.demo [--out outputs/demo] [--train 20000] [--validation 1000] [--stage1-steps N] ...
"""

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainingArguments

import modeling  # noqa: F401  (registers the models)
from data.synthetic import generate_dataset
from eval.report import load_log_history, plot_training_curves
from eval.run import evaluate_model
from modeling.presets import build_vlm

from . import train_qformer, train_vlm
from .arguments import DataArguments, QFormerModelArguments, VLMModelArguments, parse_args
from .data_setup import load_splits, text_corpus

logger = logging.getLogger("demo")

STAGE1_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def parse_demo_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    parser.add_argument("--train", type=int, default=20000, help="training samples to generate")
    parser.add_argument("--validation", type=int, default=1000, help="validation samples to generate")
    parser.add_argument("--stage1-config", default="configs/tiny/stage1.yaml")
    parser.add_argument("--stage2-config", default="configs/tiny/stage2.yaml")
    parser.add_argument("--stage1-steps", type=int, default=None, help="override max_steps of stage 1")
    parser.add_argument("--stage2-steps", type=int, default=None, help="override max_steps of stage 2")
    parser.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N validation samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further overrides for both training runs, e.g. --extra --logging_steps 5")
    return parser.parse_args(argv)


def stage1_scores(metrics: dict) -> dict:
    return {key: metrics["retrieval"][key] for key in STAGE1_KEYS}


def stage2_scores(metrics: dict) -> dict:
    """The demo's stage-2 numbers from `eval.run.evaluate_model`'s report."""
    vqa = metrics["vqa"]
    return {
        "bleu_4": metrics["captioning"]["bleu_4"],
        "cider": metrics["captioning"]["cider"],
        "cider_shuffled": metrics["captioning_shuffled"]["cider"],
        "vqa_accuracy": vqa["accuracy"],
        "vqa_accuracy_by_type": {kind: scores["accuracy"] for kind, scores in sorted(vqa["per_type"].items())},
        "caption_scene_exact": metrics["caption_scene"]["scene_exact_match"],
        "caption_object_f1": metrics["caption_scene"]["object_f1"],
    }


def save_untrained(out: Path, data: Path, seed: int, stage1_config: str, stage2_config: str) -> tuple[Path, Path]:
    """The tiny models exactly as training starts them (same configs, same tokenizers), saved for evaluation."""
    torch.manual_seed(seed)
    model_args, data_args, training_args = parse_args(
        (QFormerModelArguments, DataArguments, TrainingArguments),
        [stage1_config, "--train_data", str(data), "--eval_data", str(data)],
    )
    train_dataset, _ = load_splits(data_args, training_args.seed)
    corpus = text_corpus(train_dataset)
    qformer, qformer_processor = train_qformer.build_model(model_args, corpus, None)
    qformer.save_pretrained(out / "qformer")
    qformer_processor.save_pretrained(out / "qformer")

    vlm_args = parse_args(
        (VLMModelArguments, DataArguments, TrainingArguments),
        [stage2_config, "--train_data", str(data), "--qformer_name_or_path", str(out / "qformer")],
    )[0]
    vlm, processor = build_vlm(qformer, qformer_processor, corpus=corpus, lm=vlm_args.lm_config,
                               lm_vocab_size=vlm_args.lm_vocab_size)
    vlm.save_pretrained(out / "vlm")
    processor.save_pretrained(out / "vlm")
    return out / "qformer", out / "vlm"


def evaluate_pair(qformer: Path, vlm: Path, data: Path, out: Path, max_samples: int | None, histories=None):
    """Stage-1 retrieval and stage-2 captioning/VQA/scene checks on the validation split."""
    common = {"split": "validation", "max_samples": max_samples, "meteor": False, "batch_size": 64}
    stage1, _ = evaluate_model(str(qformer), str(data), out / "qformer", **common)
    stage2, _ = evaluate_model(str(vlm), str(data), out / "vlm", log_histories=histories, **common)
    return stage1_scores(stage1), stage2_scores(stage2)


def table(untrained: dict, trained: dict) -> str:
    rows = [("stage 1", k, untrained["stage1"][k], trained["stage1"][k]) for k in STAGE1_KEYS]
    for k, v in trained["stage2"].items():
        if isinstance(v, dict):
            rows += [("stage 2", f"vqa {t}", untrained["stage2"][k].get(t, 0.0), s) for t, s in v.items()]
        else:
            rows.append(("stage 2", k, untrained["stage2"][k], v))
    lines = ["| stage | metric | untrained | trained |", "|---|---|---|---|"]
    lines += [f"| {stage} | {name} | {a:.3f} | {b:.3f} |" for stage, name, a, b in rows]
    return "\n".join(lines)


def write_report(out: Path, metrics: dict) -> None:
    body = [
        "# qformer-vlm demo", "",
        f"Tiny models trained from random weights on {metrics['samples']['train']} synthetic images, evaluated on "
        f"{metrics['samples']['validation']} held-out ones; {metrics['wall_seconds']:.0f} s on {metrics['device']}.",
        "", table(metrics["untrained"], metrics), "",
        "`cider_shuffled`: the trained VLM captioning each image with another image's features. The gap to `cider` "
        "is what the model reads from the picture rather than from the caption template.", "",
        "![similarity grid](similarity_grid.png)", "", "![captions](captions.png)", "", "![curves](curves.png)", "",
        "Details: eval/qformer/report.md, eval/vlm/report.md, captions.csv, eval/vlm/vqa.csv.",
    ]
    (out / "report.md").write_text("\n".join(body) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    args = parse_demo_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    start = time.time()
    out = Path(args.out)
    data = out / "data"
    logger.info("1/5 generating %d training and %d validation images in %s", args.train, args.validation, data)
    generate_dataset(data, {"train": args.train, "validation": args.validation}, seed=args.seed, overwrite=True)

    logger.info("2/5 evaluating the untrained models")
    for stale in ("qformer", "vlm", "untrained", "eval"):
        shutil.rmtree(out / stale, ignore_errors=True)
    untrained_q, untrained_v = save_untrained(out / "untrained", data, args.seed, args.stage1_config,
                                              args.stage2_config)
    u1, u2 = evaluate_pair(untrained_q, untrained_v, data, out / "untrained" / "eval", args.eval_samples)

    logger.info("3/5 training stage 1 (Q-Former)")
    common = ["--train_data", str(data), "--eval_data", str(data), "--seed", str(args.seed), *args.extra]
    stage1 = [args.stage1_config, "--output_dir", str(out / "qformer"), *common]
    if args.stage1_steps:
        stage1 += ["--max_steps", str(args.stage1_steps)]
    train_qformer.main(stage1)

    logger.info("4/5 training stage 2 (VLM)")
    stage2 = [args.stage2_config, "--output_dir", str(out / "vlm"), "--qformer_name_or_path", str(out / "qformer"),
              *common]
    if args.stage2_steps:
        stage2 += ["--max_steps", str(args.stage2_steps)]
    train_vlm.main(stage2)

    logger.info("5/5 evaluating the trained models")
    histories = {f"stage {i}": load_log_history(out / name / "trainer_state.json")
                 for i, name in ((1, "qformer"), (2, "vlm"))}
    t1, t2 = evaluate_pair(out / "qformer", out / "vlm", data, out / "eval", args.eval_samples, histories)
    shutil.copy(out / "eval" / "qformer" / "similarity_grid.png", out / "similarity_grid.png")
    shutil.copy(out / "eval" / "vlm" / "captions.png", out / "captions.png")
    shutil.copy(out / "eval" / "vlm" / "captions.csv", out / "captions.csv")
    plot_training_curves(histories, out / "curves.png")

    n_validation = args.eval_samples or args.validation
    metrics = {
        "stage1": t1,
        "stage2": t2,
        "untrained": {"stage1": u1, "stage2": u2},
        "wall_seconds": round(time.time() - start, 1),
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "samples": {"train": args.train, "validation": min(n_validation, args.validation)},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_report(out, metrics)
    print("\n" + table(metrics["untrained"], metrics))
    print(f"\nwall time {metrics['wall_seconds']:.0f} s; files in {out}/: report.md, metrics.json, "
          "similarity_grid.png, captions.png, curves.png, captions.csv, qformer/, vlm/")
    return metrics


if __name__ == "__main__":
    main()
