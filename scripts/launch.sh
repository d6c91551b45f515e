#!/usr/bin/env bash
# Distributed pretraining: one torchrun per node, one rank per GPU; a restarted job resumes its newest checkpoint.
#   bash scripts/launch.sh CONFIG [--set KEY=VALUE ...]        this node (its GPUs, or NPROC_PER_NODE CPU ranks)
# Under SLURM, one task per node (SIGTERM 2 minutes before the time limit: the ranks save and stop together):
#   sbatch --nodes 4 --ntasks-per-node 1 --gpus-per-node 8 --signal=TERM@120 \
#     --wrap "srun bash scripts/launch.sh configs/vit-b-32-moe.yaml --set data.train='/data/laion/{00000..41407}.tar'"
# Resubmitting the same job continues it (--resume latest: the run's newest checkpoint, or a fresh start).
# Environment: NPROC_PER_NODE (default: SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES' count, nvidia-smi's, else 1);
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (default: SLURM's job, else this node alone); CLIPMOE_VENV (default:
# the checkout's .venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv=${CLIPMOE_VENV:-$root/.venv}
py=python3
[ -x "$venv/bin/python" ] && py="$venv/bin/python"
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: bash scripts/launch.sh CONFIG.yaml [clipmoe train options]${1:+ (no config file: $1)}" >&2
  exit 2
fi

if [ -z "${NPROC_PER_NODE:-}" ]; then  # the GPUs this job may use: SLURM's count, CUDA_VISIBLE_DEVICES, or all
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
    NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    NPROC_PER_NODE=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
  else
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [ "${NPROC_PER_NODE:-0}" -ge 1 ] 2>/dev/null || NPROC_PER_NODE=1
fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    MASTER_ADDR=127.0.0.1
  fi
fi

# exec: torchrun itself gets SLURM's SIGTERM and passes it to the ranks (clipmoe/stopping.py)
exec "$py" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m clipmoe.cli train --resume latest "$@"
