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

run_recipe llava "$REPO/recipes/llava/configs/demo.yaml" runs/demo "$@"
