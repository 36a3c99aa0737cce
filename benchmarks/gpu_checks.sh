#!/usr/bin/env bash
# Sharded training on GPUs, checked by running it: both stages of the base recipe for 2 steps under FSDP2
# (configs/accelerate/fsdp.yaml) and, where deepspeed is installed, DeepSpeed ZeRO-2; stage 1 resumed from its
# checkpoint; every output folder must load with its Auto class. Made for a machine without network: the models are
# built from configs at the base recipe's sizes (ViT-B/16 at 224 px, a 6-layer 768-wide Q-Former, a SmolLM-135M-
# shaped LM, LoRA r=64 as in configs/base/stage2.yaml, and without LoRA) with random weights, on a small synthetic
# shapes set. Not run yet on a GPU: expect a few minutes on one H200; give it a 10-minute timeout.
#
#     bash benchmarks/gpu_checks.sh                     # logs and outputs in benchmarks/results/gpu-checks-<UTC time>/
#     WHEELS=wheels/ bash benchmarks/gpu_checks.sh      # first installs `datasets` from wheels/ if it is missing
#     PYTHON=.venv/bin/python NUM_GPUS=8 OUT=/tmp/checks bash benchmarks/gpu_checks.sh
#
# Every check runs even when one before it failed; the summary at the end says PASS/FAIL/SKIP for each and the exit
# status is 1 if any failed. A check's output is in $OUT/<check>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/gpu-checks-$(date -u +%Y%m%dT%H%M%SZ)}
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-240}  # seconds per check
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ -n "${WHEELS:-}" ] && ! "$PYTHON" -c "import datasets" 2>/dev/null; then
  "$PYTHON" -m pip install --no-index --find-links "$WHEELS" datasets || exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; \
  "$PYTHON" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__)"; \
  "$PYTHON" -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>/dev/null || echo "no deepspeed"; \
} | tee "$OUT/environment.txt" >&2
[ "$NUM_GPUS" -ge 1 ] || { echo "no GPU found (set NUM_GPUS)" >&2; exit 1; }

"$PYTHON" -m data.synthetic --out "$OUT/data" --train 512 --validation 64 --image-size 224 --samples-per-shard 256 \
  --num-proc 4 > "$OUT/data.log" 2>&1 || { echo "data generation failed: $OUT/data.log" >&2; exit 1; }

# The base recipe without the Hub: configs/base/*.yaml less the pretrained model names; the models are built from
# configs at the same sizes instead. And the check that a saved folder loads, in a fresh process.
"$PYTHON" - "$OUT" <<'EOF'
import sys, yaml
for stage, names in (("stage1", ("vision_model_name_or_path", "text_model_name_or_path")),
                     ("stage2", ("language_model_name_or_path",))):
    config = yaml.safe_load(open(f"configs/base/{stage}.yaml"))
    for name in names:
        del config[name]
    yaml.safe_dump(config, open(f"{sys.argv[1]}/{stage}.yaml", "w"))
EOF
cat > "$OUT/loads.py" <<'EOF'
import os, sys, torch, transformers
auto_class, folder = sys.argv[1:]
model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True)
assert all(torch.isfinite(p).all() for p in model.parameters()), "non-finite weights"
assert not [name for name in os.listdir(folder) if "fsdp" in name], "FSDP files in the output folder"
print(type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")
EOF
VISION='{"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
"intermediate_size": 3072}'
QFORMER='{"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 3072,
"cross_attention_frequency": 2, "max_position_embeddings": 64}'
LM='{"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
"num_key_value_heads": 3}'
RUN=(--train_data "$OUT/data" --eval_data "$OUT/data" --max_eval_samples 64 --max_steps 2 --logging_steps 1
     --eval_strategy no --load_best_model_at_end false --save_strategy steps --save_steps 2 --report_to none
     --dataloader_num_workers 2)
STAGE1=("$OUT/stage1.yaml" "${RUN[@]}" --vision_config "$VISION" --qformer_config "$QFORMER" --text_vocab_size 2000
        --per_device_train_batch_size 64 --per_device_eval_batch_size 64)
STAGE2=("$OUT/stage2.yaml" "${RUN[@]}" --lm_config "$LM" --lm_vocab_size 2000 --qa_turns 1
        --per_device_train_batch_size 16 --gradient_accumulation_steps 1 --per_device_eval_batch_size 16)
LAUNCH=("$PYTHON" -m accelerate.commands.accelerate_cli launch --num_processes "$NUM_GPUS" --main_process_port 0)
LOADS=("$PYTHON" "$OUT/loads.py")

RESULTS=()
check() {  # check NAME COMMAND...: runs it with a timeout, output to $OUT/NAME.log, records PASS or FAIL
  local name=$1 status=0; shift
  echo "== $name ==" >&2
  timeout "$CHECK_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1 || status=$?
  if [ "$status" -eq 0 ]; then RESULTS+=("PASS $name"); else
    RESULTS+=("FAIL $name (exit $status, $OUT/$name.log)"); tail -n 20 "$OUT/$name.log" >&2; fi
}

for engine in fsdp deepspeed_zero2; do
  if [ "$engine" = deepspeed_zero2 ] && ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    RESULTS+=("SKIP $engine (deepspeed is not installed)"); continue
  fi
  config=(--config_file "configs/accelerate/$engine.yaml")
  qformer=$OUT/$engine/qformer
  check "$engine-stage1" "${LAUNCH[@]}" "${config[@]}" -m training.train_qformer "${STAGE1[@]}" --output_dir "$qformer"
  check "$engine-stage1-loads" "${LOADS[@]}" AutoModel "$qformer"
  check "$engine-stage1-resume" "${LAUNCH[@]}" "${config[@]}" -m training.train_qformer "${STAGE1[@]}" \
    --output_dir "$qformer" --max_steps 4 --resume_from_checkpoint true
  for lora in false true; do
    vlm=$OUT/$engine/vlm-lora-$lora
    check "$engine-stage2-lora-$lora" "${LAUNCH[@]}" "${config[@]}" -m training.train_vlm "${STAGE2[@]}" \
      --qformer_name_or_path "$qformer" --output_dir "$vlm" --use_lora "$lora"
    check "$engine-stage2-lora-$lora-loads" "${LOADS[@]}" AutoModelForImageTextToText "$vlm"
  done
done

printf '%s\n' "${RESULTS[@]}" | tee "$OUT/summary.txt"
! grep -q '^FAIL' "$OUT/summary.txt"
