"""Training throughput: the original recipe against ours, stage 1 and stage 2, one process, one device.

    python -m benchmarks.throughput                 # base sizes on CUDA; tiny sizes (a smoke check) on CPU
    python -m benchmarks.throughput --no-compile --no-cache ...   # switch single optimisations off

Models are the project's own classes built from configs with random weights (ViT-B/16 224, a 6x768 Q-Former with
32 queries, SmolLM-135M's shape with LoRA r=64), fed synthetic batches that already sit on the device, and trained by
the project's Trainer (`ParamGroupTrainer` + `DeviceNormalizeMixin`, as in the training scripts) through
`Trainer.train`: forward, backward, gradient clipping and the optimizer step, as in a real run. The loader is
measured apart (benchmarks/dataloading.py).

Prints one JSON line per case on stdout (see benchmarks/README.md for the columns); progress goes to stderr.
"""

import argparse
import gc
import json
import math
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, PrinterCallback, TrainerCallback, TrainingArguments, ViTConfig
from transformers.utils import logging as hf_logging

from cli.streams import stdout_to_stderr
from modeling.configuration_qformer import QFormerConfig
from modeling.configuration_vlm import VLMConfig
from modeling.lora import add_lora
from modeling.modeling_qformer import QFormerModel
from modeling.modeling_vlm import VLMForConditionalGeneration
from training.device_normalize import DeviceNormalizeMixin, normalize_pixels
from training.trainer import ParamGroupTrainer

# Dense bf16 peak of an H100 / H200 SXM (the figure FLOP utilisation is quoted against, for every case).
H100_BF16_PEAK = 989e12

# The original recipe's shapes. Q-Former defaults of QFormerConfig are DistilBERT's layout (6 x 768, 30,522 words);
# the LM is SmolLM-135M with the image token added (49,152 + 1, padded to a multiple of 64).
BASE = {
    "vision": {},  # ViTConfig defaults: ViT-B/16 at 224 px
    "qformer": {"vocab_size": 30522, "max_position_embeddings": 512},
    "num_query_tokens": 32,
    "caption_tokens": 48,
    "lm": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49216, "tie_word_embeddings": True,
        "max_position_embeddings": 2048, "rope_theta": 10000.0,
    },
    "image_token_id": 49152,
    "prompt_tokens": 64,  # text tokens of a conversation besides the image tokens (design.md)
    "answer_tokens": 24,  # of which the answer, where the labels are
    "lora_r": 64,
}
TINY = {
    "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 128},
    "qformer": {"vocab_size": 1000, "max_position_embeddings": 64, "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 128},
    "num_query_tokens": 8,
    "caption_tokens": 16,
    "lm": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "vocab_size": 512, "tie_word_embeddings": True, "max_position_embeddings": 128},
    "image_token_id": 511,
    "prompt_tokens": 16,
    "answer_tokens": 6,
    "lora_r": 8,
}


@dataclass(frozen=True)
class Case:
    """One measured configuration. `vision`: "pixels" (fp32 from the loader), "uint8" (normalised on the device) or
    "cache" (precomputed `vision_features`, ViT not run)."""

    name: str
    stage: int
    batch: int
    bf16: bool
    sdpa: bool
    fused_adamw: bool
    compile: bool
    vision: str
    label_logits_only: bool = False
    lora_dropout: float = 0.1
    gradient_checkpointing: bool = False
    frozen_bf16: bool = False


class BenchTrainer(DeviceNormalizeMixin, ParamGroupTrainer):
    """The training scripts' Trainer stack, without their evaluation extras."""


class StepTimer(TrainerCallback):
    """Times the steps after `warmup` (compilation, allocator warm-up) until `min_seconds` or `max_steps`."""

    def __init__(self, warmup: int, min_seconds: float, sync):
        self.warmup, self.min_seconds, self.sync = warmup, min_seconds, sync
        self.start = self.elapsed = None
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == self.warmup:
            self.sync()
            self.start = time.perf_counter()
        elif step > self.warmup and (
            step >= args.max_steps or time.perf_counter() - self.start >= self.min_seconds
        ):
            # Without a sync per step the host runs ahead; this one waits for every queued step.
            self.sync()
            self.elapsed, self.steps = time.perf_counter() - self.start, step - self.warmup
            control.should_training_stop = True


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_model(case: Case, sizes: dict, device: torch.device):
    qformer_config = QFormerConfig(
        vision_config=ViTConfig(**sizes["vision"]),
        qformer_config=sizes["qformer"],
        num_query_tokens=sizes["num_query_tokens"],
        freeze_vision=True,
    )
    with device:  # initialise on the device: base sizes take minutes to initialise on a CPU
        if case.stage == 1:
            model = QFormerModel(qformer_config)
        else:
            config = VLMConfig(
                qformer_config=qformer_config.to_dict(),
                text_config=LlamaConfig(**sizes["lm"]).to_dict(),
                image_token_id=sizes["image_token_id"],
                label_logits_only=case.label_logits_only,
            )
            model = VLMForConditionalGeneration(config)
    model.set_attn_implementation("sdpa" if case.sdpa else "eager")
    if case.stage == 2:
        model = add_lora(model, r=sizes["lora_r"], alpha=2 * sizes["lora_r"], dropout=case.lora_dropout)
    if case.frozen_bf16:
        # Weights nobody trains never need an fp32 copy; held in bf16, autocast has nothing to cast per step.
        for param in model.parameters():
            if not param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model.to(device)


def compile_repeated_blocks(model: torch.nn.Module, **compile_kwargs) -> None:
    """Regional compilation, in place: every layer of each stack of identical layers (ViT, Q-Former, LM decoder).

    Identical layers share one compiled graph, so compiling costs about one layer per stack. In place, because
    accelerate's `compile_regions` (what `torch_compile` + ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=1 does) rebuilds
    module shells, which peft's wrappers do not survive; whole-model compilation graph-breaks at the label-only
    gather anyway.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len({type(block) for block in module}) == 1:
            for block in module:
                block.compile(**compile_kwargs)


def make_batch(case: Case, sizes: dict, device: torch.device) -> tuple[dict, int]:
    """A synthetic batch on `device` and its number of text tokens (padding and image tokens excluded)."""
    g = torch.Generator().manual_seed(0)
    vcfg = ViTConfig(**sizes["vision"])
    b = case.batch
    batch = {}
    if case.vision == "cache":
        patches = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        dtype = torch.bfloat16 if case.bf16 else torch.float32
        batch["vision_features"] = torch.randn(b, patches, vcfg.hidden_size, generator=g).to(dtype)
    elif case.vision == "uint8":
        batch["pixel_values"] = torch.randint(0, 256, (b, 3, vcfg.image_size, vcfg.image_size), generator=g,
                                              dtype=torch.uint8)
    else:
        batch["pixel_values"] = torch.randn(b, 3, vcfg.image_size, vcfg.image_size, generator=g)
    if case.stage == 1:
        length = sizes["caption_tokens"]
        lengths = torch.randint(length // 4, length + 1, (b, 1), generator=g)
        batch["input_ids"] = torch.randint(1, sizes["qformer"]["vocab_size"], (b, length), generator=g)
        batch["attention_mask"] = (torch.arange(length) < lengths).long()
        batch["group_ids"] = torch.arange(b)
        text_tokens = int(batch["attention_mask"].sum())
    else:
        queries, prompt, answer = sizes["num_query_tokens"], sizes["prompt_tokens"], sizes["answer_tokens"]
        ids = torch.randint(0, sizes["image_token_id"], (b, prompt + queries), generator=g)
        ids[:, 4:4 + queries] = sizes["image_token_id"]  # "<|im_start|>user\n" then the image tokens
        labels = torch.full_like(ids, -100)
        labels[:, -answer:] = ids[:, -answer:]
        batch.update(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        text_tokens = b * prompt
    return {k: v.to(device) for k, v in batch.items()}, text_tokens


def count_step_flops(model, batch: dict, case: Case, device: torch.device, image_processor) -> tuple[int, float]:
    """FLOPs of one forward + backward, counted by torch on the eager model, and that step's loss."""
    inputs = dict(batch)
    if inputs.get("pixel_values") is not None and inputs["pixel_values"].dtype == torch.uint8:
        inputs["pixel_values"] = normalize_pixels(inputs["pixel_values"], image_processor)
    model.train()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.bf16):
            loss = model(**inputs).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops(), loss.item()


def training_arguments(case: Case, opts, output_dir: str) -> TrainingArguments:
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; the GPU box may run either.
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                     else "gradient_checkpointing")
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=case.batch,
        max_steps=opts.warmup + opts.max_steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        bf16=case.bf16,
        optim="adamw_torch_fused" if case.fused_adamw else "adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,  # the batch is already on the device
        use_cpu=opts.device.type == "cpu",
        seed=0,
        **{checkpointing: case.gradient_checkpointing},
    )


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    # Linux reports KiB; this is the whole process's peak so far, not this case's.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_process_max_rss"


def run_case(case: Case, opts, sizes: dict, image_processor) -> dict:
    device = opts.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    set_up = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(case, sizes, device)
    batch, text_tokens = make_batch(case, sizes, device)
    flops, loss = count_step_flops(model, batch, case, device, image_processor)
    if case.compile:
        # Compiled graphs of earlier cases count against dynamo's per-function cache limit: start clean.
        torch._dynamo.reset()
        compile_repeated_blocks(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(opts.warmup, opts.min_seconds, sync)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = BenchTrainer(
            model=model,
            args=training_arguments(case, opts, output_dir),
            train_dataset=list(range(case.batch * 4)),
            # a fresh dict each step: the Trainer replaces uint8 pixels in it
            data_collator=lambda rows, batch=batch: dict(batch),
            processing_class=image_processor,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the Trainer's logs on stdout, which is ours
        trainer.train()
    mem, mem_source = peak_memory_gib(device)
    steps, seconds = timer.steps, timer.elapsed
    del trainer, model, batch
    gc.collect()  # peft and the Trainer hold reference cycles; free this case's memory before the next one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = {
        "case": case.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "sizes": opts.sizes,
        "batch": case.batch,
        "steps": steps,
        "seconds": round(seconds, 4),
        "pairs_per_s": case.batch * steps / seconds,
        "tokens_per_s": text_tokens * steps / seconds,
        "flops_per_step": flops,
        "tflops_per_s": flops * steps / seconds / 1e12,
        "flop_util": flops * steps / seconds / opts.peak_flops,
        "peak_flops": opts.peak_flops,
        "peak_mem_gib": mem,
        "mem_source": mem_source,
        "loss": loss,
        "setup_s": round(time.perf_counter() - set_up - seconds, 2),
        **{k: v for k, v in asdict(case).items() if k not in ("name", "batch")},
    }
    if case.stage == 1:  # no language model in stage 1
        del result["label_logits_only"], result["lora_dropout"]
    if opts.sizes == "tiny":
        result["note"] = "tiny sizes: a smoke check of the code path, not a performance figure"
    return result


def cases(opts) -> list[Case]:
    """The original recipe and ours for each stage, with `opts`' switches applied to ours."""
    original = Case("", 1, 8, bf16=False, sdpa=False, fused_adamw=False, compile=False, vision="pixels")
    ours = Case(
        "", 1, opts.stage1_batch, bf16=opts.bf16, sdpa=opts.sdpa, fused_adamw=opts.fused_adamw,
        compile=opts.compile, vision="uint8" if opts.uint8 else "pixels", label_logits_only=opts.label_logits_only,
        lora_dropout=opts.lora_dropout, gradient_checkpointing=opts.gradient_checkpointing,
        frozen_bf16=opts.frozen_bf16,
    )
    stage2_vision = "cache" if opts.cache else ours.vision
    listed = [
        replace(original, name="stage1/original"),
        replace(ours, name="stage1/ours_vit"),
        replace(ours, name="stage1/ours_cached", vision="cache") if opts.cache else None,
        replace(original, name="stage2/original", stage=2),
        replace(ours, name="stage2/ours", stage=2, batch=opts.stage2_batch, vision=stage2_vision),
        replace(ours, name=f"stage2/ours_b{opts.memory_batch}", stage=2, batch=opts.memory_batch,
                vision=stage2_vision),
    ]
    chosen = [c for c in listed if c is not None and (not opts.cases or c.name in opts.cases)]
    unknown = set(opts.cases or ()) - {c.name for c in listed if c is not None}
    if unknown:
        raise SystemExit(f"unknown --cases {sorted(unknown)}; choose from {[c.name for c in listed if c]}")
    return chosen


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--tiny", action="store_true", help="tiny sizes (default without CUDA)")
    p.add_argument("--base", action="store_true", help="base sizes (default with CUDA)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--stage1-batch", type=int, default=None, help="ours, stage 1 (default 512; tiny 8)")
    p.add_argument("--stage2-batch", type=int, default=None, help="ours, stage 2 (default 256; tiny 8)")
    p.add_argument("--memory-batch", type=int, default=None, help="the stage-2 memory case (default 64; tiny 4)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per case (default 3, tiny 1; 5 with --compile, which compiles in them)")
    p.add_argument("--max-steps", type=int, default=None, help="timed steps at most (default 50; tiny 2)")
    p.add_argument("--min-seconds", type=float, default=None, help="time each case this long (default 4; tiny 0)")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK,
                   help="device peak the utilisation is quoted against (default: H100/H200 dense bf16, 989e12)")
    p.add_argument("--cases", type=lambda s: s.split(","), default=None, help="comma-separated subset of cases")
    p.add_argument("--bf16", action=on_off, default=True, help="bf16 autocast (ours)")
    p.add_argument("--sdpa", action=on_off, default=True, help="SDPA attention (ours; the original is eager)")
    p.add_argument("--fused-adamw", action=on_off, default=True, help="adamw_torch_fused (ours)")
    p.add_argument("--compile", action=on_off, default=None,
                   help="torch.compile each repeated layer (ours; default on with CUDA)")
    p.add_argument("--cache", action=on_off, default=True, help="cached vision features (ours)")
    p.add_argument("--uint8", action=on_off, default=True, help="uint8 pixels normalised on the device (ours)")
    p.add_argument("--label-logits-only", action=on_off, default=True, help="LM head at label positions (ours)")
    p.add_argument("--gradient-checkpointing", action=on_off, default=False, help="memory option (ours)")
    p.add_argument("--frozen-bf16", action=on_off, default=False, help="hold frozen weights in bf16 (ours)")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="ours; 0 changes the recipe, not only speed")
    opts = p.parse_args(argv)
    if opts.tiny and opts.base:
        p.error("pick one of --tiny and --base")
    opts.device = torch.device(opts.device)
    opts.sizes = "tiny" if opts.tiny or not (opts.base or opts.device.type == "cuda") else "base"
    tiny = opts.sizes == "tiny"
    defaults = {"stage1_batch": (8, 512), "stage2_batch": (8, 256), "memory_batch": (4, 64), "max_steps": (2, 50),
                "min_seconds": (0.0, 4.0), "compile": (False, opts.device.type == "cuda")}
    for name, (small, big) in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, small if tiny else big)
    if opts.warmup is None:
        opts.warmup = 5 if opts.compile else 1 if tiny else 3
    return opts


def main(argv=None) -> list[dict]:
    opts = parse_args(argv)
    hf_logging.set_verbosity_error()
    if opts.sizes == "tiny":
        log("tiny sizes: a smoke check of the benchmark's code path, not a performance measurement")
    # The processor only lends its mean/std to the device normalisation; ViT's defaults (0.5, 0.5).
    from transformers import ViTImageProcessor

    image_processor = ViTImageProcessor()
    results, original = [], {}
    for case in cases(opts):
        log(f"running {case.name} (batch {case.batch}) on {opts.device} ...")
        with stdout_to_stderr():
            result = run_case(case, opts, TINY if opts.sizes == "tiny" else BASE, image_processor)
        if case.name.endswith("/original"):
            original[case.stage] = result["pairs_per_s"]
        elif case.stage in original:
            result["ratio_vs_original"] = result["pairs_per_s"] / original[case.stage]
        if not all(math.isfinite(v) for v in result.values() if isinstance(v, float)):
            log(f"warning: non-finite values in {case.name}")
        print(json.dumps(result), flush=True)
        results.append(result)
    for r in results:
        log(f"{r['case']:<22} batch {r['batch']:>4}  {r['pairs_per_s']:>10.1f} pairs/s  "
            f"{100 * r['flop_util']:6.2f}% util  {r['peak_mem_gib']:6.2f} GiB  "
            f"x{r.get('ratio_vs_original', 1.0):.1f}")
    return results


if __name__ == "__main__":
    main()
