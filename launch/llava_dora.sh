#!/usr/bin/env bash
# LLaVA-1.5 visual instruction tuning with DoRA under the DeepSpeed launcher.
#
#   bash launch/llava_dora.sh                                   # the built-in demo (tiny model, generated data,
#                                                               # written to runs/demo in the current folder)
#   bash launch/llava_dora.sh CONFIG [key=value ...]            # e.g. recipes/llava/configs/llava_v1_5_7b_dora.yaml
#   HOSTFILE=hosts NUM_NODES=2 bash launch/llava_dora.sh CONFIG # many nodes (DeepSpeed hostfile: "host slots=8")
#
# Uses every local GPU; without a GPU, 2 CPU processes talking over gloo. NUM_GPUS overrides the count.
set -euo pipefail
source "$(dirname "$0")/deepspeed_env.sh"

demo=0
if [ $# -eq 0 ] || [[ "$1" == *=* ]]; then
  demo=1
  config=$REPO/recipes/llava/configs/demo.yaml
else
  config=$1
  shift
fi

deepspeed_launcher "$(( demo ? 2 : 0 ))"   # the demo's global batch is 8 = 4 x 2 processes
if [ "$demo" = 1 ]; then
  run=$("$PYTHON" -m recipes.demo run-dir runs/demo/run "$@")   # a finished run is kept: a rerun trains beside it
  set -- "$@" "train.output_dir=$run"
  "$PYTHON" -m recipes.llava.demo prepare --root runs/demo
fi
"${launcher[@]}" "$REPO/recipes/llava/train.py" "$config" "$@"
if [ "$demo" = 1 ]; then
  "$PYTHON" -m recipes.llava.demo finish --root runs/demo --run "$run"
fi
