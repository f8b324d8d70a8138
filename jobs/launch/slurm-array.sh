#!/usr/bin/env bash
# One kdcache cache-build worker per node, as a SLURM job array: array task i is worker i of N.
#
#   sbatch --array=0-3 jobs/launch/slurm-array.sh jobs/teacher-qwen2.5-72b-vllm.yaml s3://bucket/caches/upsc-72b-k64
#   sbatch --array=0-3%2 ...      # at most 2 nodes at a time; the cache is the same
#
# Each task runs its own vLLM engine on its own node (tensor parallel over the node's GPUs, from the job spec) and
# writes only the shards i with i % N == its index, so the workers share nothing but the output location (a shared
# filesystem path or an fsspec URL). The last worker to finish writes the manifest. A failed or pre-empted task is
# simply resubmitted (`sbatch --array=2 ...`): it skips its committed shards. If tasks end in an order that leaves
# no manifest (e.g. one was resubmitted after the others ended), run `kdcache cache finalize OUTPUT` once.
#
# Extra arguments after OUTPUT go to `kdcache cache build`, e.g. --data more.jsonl --set teacher.vllm.seed=1.
#SBATCH --job-name=kdcache-teacher
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/kdcache-teacher-%A-%a.out
#SBATCH --requeue
set -euo pipefail

CONFIG=${1:?usage: slurm-array.sh JOB.yaml OUTPUT [kdcache cache build options...]}
OUTPUT=${2:?usage: slurm-array.sh JOB.yaml OUTPUT [kdcache cache build options...]}
shift 2

: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-(N-1)}"
# N is the array size (task ids must be 0..N-1; a throttle such as %2 does not change N).
NUM_WORKERS=${KDCACHE_NUM_WORKERS:-${SLURM_ARRAY_TASK_COUNT:?cannot tell the number of workers; set KDCACHE_NUM_WORKERS}}
WORKER_INDEX=$SLURM_ARRAY_TASK_ID
if (( WORKER_INDEX >= NUM_WORKERS )); then
  echo "array task $WORKER_INDEX is not below the number of workers $NUM_WORKERS; use --array=0-$((NUM_WORKERS - 1))" >&2
  exit 2
fi

# Models and the hub cache come from a shared location; nothing is downloaded on compute nodes unless allowed.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
mkdir -p logs

echo "kdcache worker $WORKER_INDEX of $NUM_WORKERS on $(hostname): $CONFIG -> $OUTPUT"
srun --ntasks=1 kdcache cache build \
  --config "$CONFIG" \
  --output "$OUTPUT" \
  --num-workers "$NUM_WORKERS" \
  --worker-index "$WORKER_INDEX" \
  --no-progress \
  "$@"
