#!/usr/bin/env bash
# The device check on one GPU, about 7 minutes (an H200 took 4.5 before the train_step and quickstart_graphs
# steps): the CUDA tests, the MoE layer benchmark (clipmoe vs DeepSpeed vs k dense passes, with a kernel profile
# of every row), a training step eager vs with CUDA graphs, the zero-shot classifier and image embedding
# benchmarks and bf16 quickstarts (eager, and with train.cuda_graphs); a short table at the end. From the
# repository root on the GPU machine:
#   bash scripts/bench/gpu_check.sh
# Packages that machine lacks (open-clip-torch, ftfy, webdataset, deepspeed and their needs) travel as
# wheels in .whl/, made by scripts/bench/gpu_wheels.sh; they are installed to /tmp/site first. Logs go to
# $OUT. ONLY="cuda_tests moe_layer" runs a subset of the steps.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

summary=()
failed=0
step() {  # step NAME SECONDS CMD...: CMD's output to the screen and $OUT/NAME.log; rc and time to the table
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  [[ -z "${ONLY:-}" || " $ONLY " == *" $name "* ]] || return 0  # ONLY="moe_layer quickstart_bf16": a subset
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || failed=1
  summary+=("$(printf '%-16s rc %-4s %5ss' "$name" "$rc" "$((SECONDS - t0))")")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, torch.nn.functional as F; print('torch', torch.__version__, torch.cuda.get_device_name(0),
      'F.grouped_mm' if hasattr(F, 'grouped_mm') else 'torch._grouped_mm')"
step cuda_tests 210 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
step moe_layer 200 "$PY" scripts/bench/moe_layer.py --device cuda --reps 20 --profile /tmp/moe_profiles
step moe_layer_b2b 150 env MASTER_PORT=29534 "$PY" scripts/bench/moe_layer.py --device cuda --reps 10 --back-to-back
tar czf "$OUT/moe_profiles.tar.gz" -C /tmp moe_profiles 2>/dev/null
step train_step 120 "$PY" scripts/bench/train_step.py
step zeroshot 100 "$PY" scripts/bench/zeroshot.py --device cuda --classes 1000
step encode_images 60 "$PY" scripts/bench/encode_images.py --device cuda --images 512
step quickstart_bf16 200 "$PY" -m clipmoe.cli quickstart --out /tmp/quickstart --set train.precision=bf16
step quickstart_graphs 200 "$PY" -m clipmoe.cli quickstart --out /tmp/quickstart_graphs --set train.precision=bf16 \
  --set train.cuda_graphs=true

echo "=== summary ($(date -u +%F), $(hostname))"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
for log in moe_layer moe_layer_b2b; do
  echo "-- $log"; grep -E "^ *[0-9]+ +(fp32|bf16)|kernels, device ms" "$OUT/$log.log" 2>/dev/null
done | tee -a "$OUT/summary.txt"
grep -h "train step ms" "$OUT/train_step.log" 2>/dev/null | tee -a "$OUT/summary.txt"
grep -hE "^(clipmoe-micro|ViT-B-32) " "$OUT/encode_images.log" 2>/dev/null | tee -a "$OUT/summary.txt"
for log in quickstart_bf16 quickstart_graphs; do
  [ -f "$OUT/$log.log" ] && { echo "-- $log"; grep -E "^(colour|background) |finished in" "$OUT/$log.log" | cut -c1-100; }
done | tee -a "$OUT/summary.txt"
exit $failed
