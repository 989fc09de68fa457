#!/usr/bin/env bash
# The GPU paths end to end, on a machine with one or more CUDA GPUs (issue 28):
#
#   benchmarks/gpu_check.sh ROOT WEIGHTS [OUT]
#
# ROOT: an FM_UIA root (train/, val/); WEIGHTS: the DINOv3 ViT-S/16 file (nothing downloads);
# OUT: where the runs go (default runs/gpu_check). In order, with bf16 autocast (train.amp):
#   1. images/s and peak GPU memory of the full model at 224 px (benchmarks/train_throughput.py
#      on ROOT, loader workers 0 and 4);
#   2. `train` under torchrun on every GPU (DDP, NCCL), 50 steps of AU, with its wall time;
#   3. the full setting of m2dino_aggregation (TS, CG, AU) for 5 steps per task, one seed;
#   4. with two GPUs or more: `compare` of TS on two tasks with two workers on two devices
#      (--devices 0,1), and which GPU each worker process used (nvidia-smi).
# On a machine without a GPU it stops at once (exit 2): the same paths are tested on the CPU by
# the test suite (gloo DDP, job-queue workers, a worker's CUDA_VISIBLE_DEVICES, tiny models).
set -euo pipefail
root=${1:?usage: benchmarks/gpu_check.sh ROOT WEIGHTS [OUT]}
weights=${2:?usage: benchmarks/gpu_check.sh ROOT WEIGHTS [OUT]}
out=${3:-runs/gpu_check}
python=${PYTHON:-python}
if ! gpus=$("$python" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null); then
    echo "gpu_check: $python cannot import torch: run it with taskgroup's environment active (or PYTHON=...)" >&2
    exit 2
fi
if [ "$gpus" -lt 1 ]; then
    echo "gpu_check: no CUDA GPU here (torch sees none); the CPU paths are the test suite's" >&2
    exit 2
fi
[ -d "$root" ] || { echo "gpu_check: $root: no such data root" >&2; exit 2; }
[ -f "$weights" ] || { echo "gpu_check: $weights: no such weights file" >&2; exit 2; }
mkdir -p "$out"
full=(--config configs/full.yaml --data "$root" --set "model.backbone.pretrained=$weights" --set train.amp=true)
echo "== $gpus GPU(s): $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | paste -sd ';')"

echo "== 1. throughput of the full model at 224 px (images/s, peak GPU memory)"
"$python" benchmarks/train_throughput.py --config configs/full.yaml --data "$root" --steps 60 \
    --workers 0 4 --json "$out/throughput.json"

echo "== 2. train under torchrun on $gpus GPU(s): AU, 50 steps"
start=$(date +%s)
"$python" -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m taskgroup train \
    "${full[@]}" --grouping au --set train.steps=50 --set train.eval_every=50 \
    --set train.checkpoint_every=50 --out "$out/ddp"
wall=$(( $(date +%s) - start ))
echo "ddp: 50 steps of batch 32 per rank on $gpus GPU(s) in ${wall} s, evaluation and start-up included"

echo "== 3. m2dino_aggregation, full setting, 5 steps per task, one seed"
taskgroup study run studies/m2dino_aggregation.yaml --setting full --data "$root" \
    --set "model.backbone.pretrained=$weights" --set train.steps_per_task=5 \
    --set compare.seeds=1 --out "$out/m2dino_aggregation"

if [ "$gpus" -ge 2 ]; then
    echo "== 4. two workers on two devices"
    tasks=$("$python" - "$root" <<'PY'
import sys
from taskgroup.config import DataConfig
from taskgroup.tasks import load_registry
from taskgroup.training.data import data_tasks
print(" ".join(data_tasks(DataConfig(root=sys.argv[1]), load_registry())[:2]))
PY
)
    # shellcheck disable=SC2086  # two task ids, split on purpose
    taskgroup compare "${full[@]}" --groupings ts --tasks $tasks --seeds 1 --set train.steps_per_task=100 \
        --devices 0,1 --workers 2 --out "$out/workers" &
    job=$!
    sleep 60
    nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv || true
    wait "$job"
fi
echo "== done: $out"
