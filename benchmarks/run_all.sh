#!/usr/bin/env bash
# The whole GPU benchmark in one command (about 5 minutes on one H100/H200; give it a 10-minute timeout):
#
#     bash benchmarks/run_all.sh                  # results in benchmarks/results/<UTC time>/
#     PYTHON=.venv/bin/python OUT=/tmp/bench bash benchmarks/run_all.sh
#
# Pass 1 runs every case eagerly (fast, so a short GPU window always yields numbers); pass 2 repeats them with
# torch.compile on "ours", which is the compile on/off comparison. Each case's JSON line is flushed as it finishes,
# so a pass cut short by a timeout keeps what it measured. The loader benchmark runs only where `datasets` is
# installed (it is not on the GPU box; run it on any machine with the project's environment). The padding benchmark
# (length grouping against random batches) needs no GPU and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results/$(date -u +%Y%m%dT%H%M%SZ)}
PASS_TIMEOUT=${PASS_TIMEOUT:-270}  # seconds per pass
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; \
  "$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; \
} | tee "$OUT/environment.txt" >&2

status=0
echo "== pass 1: eager ==" >&2
timeout "$PASS_TIMEOUT" "$PYTHON" -m benchmarks.throughput --no-compile "$@" | tee "$OUT/throughput-eager.jsonl" || status=$?
echo "== pass 2: torch.compile on ours ==" >&2
timeout "$PASS_TIMEOUT" "$PYTHON" -m benchmarks.throughput --compile "$@" | tee "$OUT/throughput-compiled.jsonl" || status=$?

if "$PYTHON" -c "import datasets" 2>/dev/null; then
  echo "== data loading ==" >&2
  workers="0,1,2"
  if [ "$(( $(nproc) / 2 ))" -gt 2 ]; then workers="$workers,$(( $(nproc) / 2 ))"; fi
  timeout "$PASS_TIMEOUT" "$PYTHON" -m benchmarks.dataloading --workers "$workers" | tee "$OUT/dataloading.jsonl" || status=$?
else
  echo "== data loading skipped: no 'datasets' here ==" >&2
fi
echo "== padding with and without length grouping (CPU, seconds) ==" >&2
timeout "$PASS_TIMEOUT" "$PYTHON" -m benchmarks.padding | tee "$OUT/padding.jsonl" || status=$?
echo "results in $OUT" >&2
exit "$status"
