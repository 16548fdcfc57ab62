#!/usr/bin/env bash
# Everything that needs a GPU, in one run of about 8 minutes on one H100, each step bounded; one JSON of results.
#
#   bash bench/gpu_wheels.sh   # here, once (the wheels the GPU machine lacks, into .whl/)
#   bash bench/gpu.sh          # on the GPU machine: device tool run(carry=[".whl"], command="bash bench/gpu.sh")
#
# Steps: bench/cuda_parity.py (our DoRA / QDoRA against PEFT's in bf16), bench/dora_layer.py on CUDA (bf16),
# bench/qdora.py (ours vs PEFT QDoRA / QLoRA, bf16 compute), bench/generate.py (batch 16 with shared prefixes vs
# batch 1, bf16), bench/llava_train.py (the LLaVA step vs Trainer + PEFT DoRA, bf16). Writes $OUT/gpu_results.json
# ($OUT: the device tool's folder that comes back; runs/gpu otherwise) and each step's log beside it. Without a GPU
# it prints one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU on this machine; nothing to run"
  exit 0
fi
dest=${OUT:-runs/gpu}
mkdir -p "$dest"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "bench/gpu.sh: the carried wheels did not install"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
: > "$dest/steps.jsonl"

step() {  # name, seconds allowed, command...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$dest/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (log: $dest/$name.log)"
  printf '{"step": "%s", "exit": %d, "seconds": %d}\n' "$name" "$rc" "$((SECONDS - start))" >> "$dest/steps.jsonl"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$dest/gpu.txt" 2>&1
step cuda_parity 60 "$PY" bench/cuda_parity.py --json "$dest/cuda_parity.json"
step dora_layer 120 "$PY" bench/dora_layer.py --budget 4 --reps 5 --json "$dest/dora_layer.json"
step qdora 75 "$PY" bench/qdora.py --out "$dest/qdora.json"
step generate 105 "$PY" bench/generate.py --size mid --rounds 2 --work /tmp/bench_generate --out "$dest/generate.json"
step llava_train 120 "$PY" bench/llava_train.py --rounds 2 --root /tmp/bench_llava --json "$dest/llava_train.json"

"$PY" - "$dest" <<'PYEOF'
import json, pathlib, sys
dest = pathlib.Path(sys.argv[1])
result = {"gpu": (dest / "gpu.txt").read_text().strip(),
          "steps": [json.loads(line) for line in (dest / "steps.jsonl").read_text().splitlines()]}
for step in result["steps"]:
    path = dest / f"{step['step']}.json"
    step["result"] = json.loads(path.read_text()) if path.is_file() else None
(dest / "gpu_results.json").write_text(json.dumps(result, indent=1) + "\n")
print(f"wrote {dest / 'gpu_results.json'}")
PYEOF
