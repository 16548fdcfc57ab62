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

run_recipe vlm "$REPO/recipes/vlm/configs/demo.yaml" runs/vlm_demo "$@"
