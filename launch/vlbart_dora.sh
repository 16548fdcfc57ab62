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
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed

kind=image
if [ "${1:-}" = video ]; then
  kind=video
  shift
fi
demo=0
if [ $# -eq 0 ] || [[ "$1" == *=* ]]; then
  demo=1
  config=recipes/vlbart/configs/demo_$kind.yaml
else
  config=$1
  shift
fi
demo_args=(--root "runs/vlbart_demo")
[ "$kind" = video ] && demo_args=(--video --root "runs/vlbart_video_demo")

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
  [ "$demo" = 1 ] && gpus=$(( gpus < 2 ? gpus : 2 ))   # the demo's task batches are sized for 2 processes
else
  gpus=${NUM_GPUS:-2}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

launcher=("$DEEPSPEED" --num_gpus "$gpus" --master_port "${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}")
if [ -n "${HOSTFILE:-}" ]; then
  launcher=("$DEEPSPEED" --hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-1}" --num_gpus "$gpus"
            --master_addr "${MASTER_ADDR:-$(hostname)}" --master_port "${MASTER_PORT:-29500}")
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
if [ "$demo" = 1 ]; then
  "$PYTHON" -m recipes.vlbart.demo prepare "${demo_args[@]}"
fi
"${launcher[@]}" recipes/vlbart/train.py "$config" "$@"
if [ "$demo" = 1 ]; then
  "$PYTHON" -m recipes.vlbart.demo finish "${demo_args[@]}"
fi
