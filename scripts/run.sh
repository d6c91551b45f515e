#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs a job:
#   bash scripts/run.sh quickstart [--out DIR]   make shards, pretrain a small MoE CLIP, zero-shot evaluate
#   bash scripts/run.sh test [pytest args]       the test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CLIPMOE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# Re-install only when the project's dependencies (or this script) change.
stamp="$VENV/.clipmoe-installed-$(cat pyproject.toml scripts/run.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
  # DeepSpeed (its engine, and the reference MoE layer of the benchmarks) is a source package whose setup imports
  # torch: built against the torch above, without its CUDA/C++ ops (compiled on first use where needed)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check wheel
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation deepspeed==0.19.8
  # its CPU communication op compiles on first use (~45 s): here, with the set-up, not inside the first test
  "$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null 2>&1 || true
  rm -f "$VENV"/.clipmoe-installed-*
  touch "$stamp"
fi

job=${1:-}
shift || true
case "$job" in
  quickstart) exec "$VENV/bin/clipmoe" quickstart "$@" ;;
  test)
    # the default run (without the tests marked slow: see pyproject's addopts), then the slow ones; the
    # durations show what to mark, to keep the default run under 15 minutes
    "$VENV/bin/python" -m pytest -q --durations=15 "$@" || exit $?
    rc=0
    "$VENV/bin/python" -m pytest -q -m slow --durations=5 "$@" || rc=$?
    [ "$rc" -eq 5 ] && rc=0  # arguments that select no slow test
    exit "$rc" ;;
  *) echo "usage: bash scripts/run.sh quickstart|test [args]" >&2; exit 2 ;;
esac
