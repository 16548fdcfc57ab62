#!/usr/bin/env bash
# Here, before a session's GPU run: the Python 3.12 wheels the GPU machine lacks (it has torch, transformers, peft,
# accelerate, but no DeepSpeed or bitsandbytes, and reaches no registry), into .whl/ (ignored by git), about 46 MB.
# The device tool carries them: run(..., carry=[".whl"], command="bash bench/gpu.sh").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
v() { "$PY" -c "from importlib.metadata import version; print(version('$1'))"; }
# DeepSpeed needs pydantic, which that machine's image lacks; hjson likewise
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "bitsandbytes==$(v bitsandbytes)" "hjson==$(v hjson)" "pydantic==$(v pydantic)" \
  "pydantic-core==$(v pydantic-core)" "annotated-types==$(v annotated-types)" "typing-inspection==$(v typing-inspection)"
# DeepSpeed ships a source archive only: built here into a pure-Python wheel (its ops compile where they run)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$(v deepspeed)"
du -sh .whl
