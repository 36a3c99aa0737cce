"""The cost of an instruction-aware Q-Former in a stage-2 training step, against the same model without it.

    python -m benchmarks.instruction_cost                  # the tiny preset on shapes batches, CPU
    python -m benchmarks.instruction_cost --steps 40 --separate-turns false

Both models are the tiny preset's (configs/tiny: 16 queries, nine of them isolated cell queries, the 2-layer LM) with
random weights, built by the project's builders, and trained by plain AdamW steps on the same batches of a
generated shapes set, drawn by the collator the training script uses. With `--separate-turns` (the tiny preset's
setting) a conversation without the option shares one copy of its image's tokens between all its turns; with it,
each turn has its own copy, whose visual tokens read that turn's question: that is where the cost comes from, so the
script also reports the tokens per sequence and the images the vision encoder runs per batch.

Each case runs its warm-up steps, then `--steps` timed ones, alternating between the two models so that a machine
that speeds up or slows down meanwhile affects both alike. One JSON line per case on stdout (`seconds_per_step`
is the median of its steps), then one with the ratio; progress goes to stderr.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from cli.streams import stdout_to_stderr
from data.loading import load_image_text_dataset
from data.synthetic import write_split
from modeling.presets import build_tiny_qformer, build_vlm
from training.conversation_collator import ConversationCollator
from training.stage import text_corpus


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512, help="shapes samples to generate and batch")
    parser.add_argument("--batch", type=int, default=32, help="conversations per batch (the tiny preset's)")
    parser.add_argument("--qa-turns", type=int, default=5, help="question-answer turns beside the caption")
    parser.add_argument("--separate-turns", type=lambda s: s.lower() == "true", default=True,
                        help="true (the tiny preset) or false: one running conversation per image")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(corpus, instruction_aware: bool, seed: int):
    """The tiny preset's stage-2 model (stage-1 settings of configs/tiny/stage1.yaml) with or without the option."""
    torch.manual_seed(seed)
    qformer, qformer_processor = build_tiny_qformer(corpus, regional_queries=3, isolate_regional_queries=True)
    torch.manual_seed(seed + 1)
    model, processor = build_vlm(qformer, qformer_processor, corpus=corpus, instruction_aware_qformer=instruction_aware)
    model.set_attn_implementation("eager")  # the tiny preset's setting on CPU (configs/tiny/stage2.yaml)
    return model.train(), processor


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, stdout_to_stderr():
        write_split(f"{tmp}/data", "train", args.samples, seed=args.seed, num_proc=1)
        dataset = load_image_text_dataset(f"{tmp}/data", split="train")
        rows = [dataset[i] for i in range(len(dataset))]
        corpus = text_corpus(dataset)
        cases = {}
        for instruction_aware in (False, True):
            model, processor = build(corpus, instruction_aware, args.seed)
            collator = ConversationCollator(processor, max_length=512, qa_turns=args.qa_turns, seed=args.seed,
                                            separate_turns=args.separate_turns, instruction_aware=instruction_aware)
            batches = [collator(rows[i : i + args.batch]) for i in range(0, len(rows) - args.batch + 1, args.batch)]
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            cases[instruction_aware] = {"model": model, "optimizer": optimizer, "batches": batches, "times": []}
        for step in range(args.warmup + args.steps):
            for case in cases.values():
                batch = case["batches"][step % len(case["batches"])]
                start = time.perf_counter()
                loss = case["model"](**batch).loss
                loss.backward()
                case["optimizer"].step()
                case["optimizer"].zero_grad(set_to_none=True)
                if step >= args.warmup:
                    case["times"].append(time.perf_counter() - start)
            print(f"step {step + 1}/{args.warmup + args.steps}", file=sys.stderr)
    lines = []
    for instruction_aware, case in cases.items():
        batches = case["batches"]
        lines.append({
            "case": "instruction_aware" if instruction_aware else "plain",
            "separate_turns": args.separate_turns,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "seconds_per_step": statistics.median(case["times"]),
            "tokens_per_sequence": statistics.mean(b["input_ids"].shape[1] for b in batches),
            "images_per_batch": statistics.mean(len(b["pixel_values"]) for b in batches),
        })
    lines.append({"case": "ratio instruction_aware / plain",
                  "seconds_per_step": lines[1]["seconds_per_step"] / lines[0]["seconds_per_step"]})
    for line in lines:
        print(json.dumps(line), flush=True)
    return lines


if __name__ == "__main__":
    main()
