#!/usr/bin/env bash
# VL-BART multitask fine-tuning with DoRA under the DeepSpeed launcher.
#
#   bash launch/vlbart_dora.sh                                   # the built-in image demo (tiny BART, generated data)
#   bash launch/vlbart_dora.sh video                             # the built-in video demo (generated videos)
#   bash launch/vlbart_dora.sh CONFIG [key=value ...]            # e.g. recipes/vlbart/configs/vlbart_image_dora.yaml
#   bash launch/vlbart_dora.sh video CONFIG [key=value ...]      # e.g. recipes/vlbart/configs/vlbart_video_dora.yaml
#   HOSTFILE=hosts NUM_NODES=2 bash launch/vlbart_dora.sh CONFIG # many nodes (DeepSpeed hostfile: "host slots=8")
#
# Uses every local GPU; without a GPU, 2 CPU processes talking over gloo. NUM_GPUS overrides the count.
# After training, `python -m recipes.vlbart.evaluate RUN_DIR` scores the run (the demo does it here).
set -euo pipefail
source "$(dirname "$0")/deepspeed_env.sh"

kind=image
if [ "${1:-}" = video ]; then
  kind=video
  shift
fi
root=runs/vlbart_demo demo_args=()
if [ "$kind" = video ]; then
  root=runs/vlbart_video_demo demo_args=(--video)
fi
run_recipe vlbart "$REPO/recipes/vlbart/configs/demo_$kind.yaml" "$root" "$@"
