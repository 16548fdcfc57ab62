# Sourced by the launch scripts: REPO (the repository), the Python and DeepSpeed to use, and
# `deepspeed_launcher [MAX_GPUS]`, which runs the DeepSpeed ops pre-flight and sets the array `launcher`: every local
# GPU (NUM_GPUS overrides the count, MAX_GPUS caps it), or without a GPU 2 CPU processes over gloo; with HOSTFILE,
# many nodes (NUM_NODES, MASTER_ADDR).
# The scripts stay in the folder they are run from: a config path, and every relative path inside a config, is
# relative to that folder (the demos write runs/... there); only the repository's own files are found through REPO.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false

deepspeed_launcher() {
  local cap=${1:-0}
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpus=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
    if [ "$cap" -gt 0 ]; then gpus=$(( gpus < cap ? gpus : cap )); fi
  else
    gpus=${NUM_GPUS:-2}
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  fi
  # pre-flight: DeepSpeed's ops in this environment's own folder, built here (once) rather than by every rank
  # waiting on one lock; a build lock left by a killed build is named with how to remove it (exit 2)
  "$PYTHON" -m recipes.deepspeed_ops check
  launcher=("$DEEPSPEED" --num_gpus "$gpus" --master_port "${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}")
  if [ -n "${HOSTFILE:-}" ]; then
    launcher=("$DEEPSPEED" --hostfile "$HOSTFILE" --num_nodes "${NUM_NODES:-1}" --num_gpus "$gpus"
              --master_addr "${MASTER_ADDR:-$(hostname)}" --master_port "${MASTER_PORT:-29500}")
  fi
}

# `run_recipe RECIPE DEMO_CONFIG DEMO_ROOT [CONFIG] [key=value ...]`: recipes/RECIPE/train.py on CONFIG under the
# launcher, or, when no CONFIG is given, the recipe's built-in demo (DEMO_CONFIG, at most 2 processes: its batches
# are sized for them): `python -m recipes.RECIPE.demo prepare` in DEMO_ROOT, training in a new run folder there (a
# finished run is kept: recipes/demo.py), then `finish` (merge, evaluate, report). The array `demo_args`, when the
# caller sets it, goes to prepare and finish.
run_recipe() {
  local recipe=$1 config=$2 root=$3 demo=0 run
  shift 3
  if [ $# -eq 0 ] || [[ "$1" == *=* ]]; then
    demo=1
  else
    config=$1
    shift
  fi
  deepspeed_launcher "$(( demo ? 2 : 0 ))"
  if [ "$demo" = 1 ]; then
    run=$("$PYTHON" -m recipes.demo run-dir "$root/run" "$@")
    set -- "$@" "train.output_dir=$run"
    "$PYTHON" -m "recipes.$recipe.demo" prepare ${demo_args[@]+"${demo_args[@]}"} --root "$root"
  fi
  "${launcher[@]}" "$REPO/recipes/$recipe/train.py" "$config" "$@"
  if [ "$demo" = 1 ]; then
    "$PYTHON" -m "recipes.$recipe.demo" finish ${demo_args[@]+"${demo_args[@]}"} --root "$root" --run "$run"
  fi
}
