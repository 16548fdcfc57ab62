#!/usr/bin/env bash
# DoRA visual instruction tuning of any transformers image-text-to-text model under the DeepSpeed launcher.
#
#   python -m recipes.inspect MODEL_DIR --out dora.yaml           # what to target; paste it into your config
#   bash launch/vlm_dora.sh CONFIG [key=value ...]                # e.g. recipes/vlm/configs/qwen2_vl_dora.yaml
#   HOSTFILE=hosts NUM_NODES=2 bash launch/vlm_dora.sh CONFIG     # many nodes (DeepSpeed hostfile: "host slots=8")
#
# Uses every local GPU; without a GPU, 2 CPU processes talking over gloo. NUM_GPUS overrides the count.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed

if [ $# -eq 0 ]; then
  sed -n '2,8p' "$0"
  exit 2
fi
config=$1
shift

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
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
"${launcher[@]}" recipes/vlm/train.py "$config" "$@"
