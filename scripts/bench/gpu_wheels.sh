#!/usr/bin/env bash
# The wheels that the GPU machine (Python 3.12, its own torch, no network) lacks, into .whl/, where
# scripts/bench/gpu_check.sh installs them from. Run on a machine where pip can download:
#   bash scripts/bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}  # needs torch: DeepSpeed's setup imports it
DEST=${DEST:-.whl}
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0
# DeepSpeed publishes only a source archive: build a pure-Python wheel (no compiled ops; its MoE layer needs none)
src=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$src" deepspeed==0.19.8
"$PY" -m pip install -q wheel setuptools
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$src"/deepspeed-0.19.8.tar.gz
rm -rf "$src"
ls "$DEST"
