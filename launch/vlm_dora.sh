#!/usr/bin/env bash
# DoRA visual instruction tuning of any transformers image-text-to-text model under the DeepSpeed launcher.
#
#   bash launch/vlm_dora.sh                                       # the built-in demo (a tiny llava-1.5-hf-shaped
#                                                                 # checkpoint, generated data; runs/vlm_demo here)
#   python -m recipes.inspect MODEL_DIR --out dora.yaml           # what to target; paste it into your config
#   bash launch/vlm_dora.sh CONFIG [key=value ...]                # e.g. recipes/vlm/configs/qwen2_vl_2b_dora.yaml
#   HOSTFILE=hosts NUM_NODES=2 bash launch/vlm_dora.sh CONFIG     # many nodes (DeepSpeed hostfile: "host slots=8")
#
# Uses every local GPU; without a GPU, 2 CPU processes talking over gloo. NUM_GPUS overrides the count.
set -euo pipefail
source "$(dirname "$0")/deepspeed_env.sh"

demo=0
if [ $# -eq 0 ] || [[ "$1" == *=* ]]; then
  demo=1
  config=$REPO/recipes/vlm/configs/demo.yaml
else
  config=$1
  shift
fi

deepspeed_launcher "$(( demo ? 2 : 0 ))"   # the demo's global batch is 8 = 4 x 2 processes
if [ "$demo" = 1 ]; then
  run=$("$PYTHON" -m recipes.demo run-dir runs/vlm_demo/run "$@")   # a finished run is kept: a rerun trains beside it
  set -- "$@" "train.output_dir=$run"
  "$PYTHON" -m recipes.vlm.demo prepare --root runs/vlm_demo
fi
"${launcher[@]}" "$REPO/recipes/vlm/train.py" "$config" "$@"
if [ "$demo" = 1 ]; then
  "$PYTHON" -m recipes.vlm.demo finish --root runs/vlm_demo --run "$run"
fi
