#!/usr/bin/env bash
# DoRA visual instruction tuning of any transformers image-text-to-text model under the DeepSpeed launcher.
#
#   python -m recipes.inspect MODEL_DIR --out dora.yaml           # what to target; paste it into your config
#   bash launch/vlm_dora.sh CONFIG [key=value ...]                # e.g. recipes/vlm/configs/qwen2_vl_2b_dora.yaml
#   HOSTFILE=hosts NUM_NODES=2 bash launch/vlm_dora.sh CONFIG     # many nodes (DeepSpeed hostfile: "host slots=8")
#
# Uses every local GPU; without a GPU, 2 CPU processes talking over gloo. NUM_GPUS overrides the count.
set -euo pipefail
source "$(dirname "$0")/deepspeed_env.sh"

if [ $# -eq 0 ]; then
  sed -n '2,8p' "$0"
  exit 2
fi
config=$1
shift

deepspeed_launcher
"${launcher[@]}" "$REPO/recipes/vlm/train.py" "$config" "$@"
