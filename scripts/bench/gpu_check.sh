#!/usr/bin/env bash
# The device check: CUDA tests and the MoE layer benchmark on one GPU, in a few minutes, short table out.
# Run from the repository root on the GPU machine (see DEVELOPERS.md / the device tool's README):
#   bash scripts/bench/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
python -m pytest -q -m cuda tests 2>&1 | tail -3
python scripts/bench/moe_layer.py --device cuda --reps 10
python scripts/bench/zeroshot.py --device cuda --classes 1000
