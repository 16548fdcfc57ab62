# Two entry points; both create the environment from requirements.txt when it is missing or stale.
#   make demo   the main job on its built-in demo
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OPS    := $(VENV)/.deepspeed_ops

.PHONY: demo demo-vlbart demo-video demo-vlm test bench bench-all bench-quick decomposition env clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# DeepSpeed's CPU op, compiled once into the environment's own folder (recipes/deepspeed_ops.py)
$(OPS): $(STAMP)
	$(PY) -m recipes.deepspeed_ops build
	touch $(OPS)

env: $(OPS)

demo: $(OPS)
	bash launch/llava_dora.sh

demo-vlbart: $(OPS)
	bash launch/vlbart_dora.sh

demo-video: $(OPS)
	bash launch/vlbart_dora.sh video

demo-vlm: $(OPS)
	bash launch/vlm_dora.sh

test: $(OPS)
	$(PY) -m pytest -q

bench: $(OPS)
	$(PY) bench/dora_layer.py

bench-all: $(OPS)
	$(PY) bench/dora_layer.py
	$(PY) bench/qdora.py
	$(PY) bench/vlbart_step.py
	$(PY) bench/features.py
	$(PY) bench/video.py
	$(PY) bench/generate.py
	$(PY) bench/llava_train.py

decomposition: $(OPS)
	$(PY) bench/decomposition.py --out runs/decomposition --results bench/results_decomposition_cpu.json --figures docs

bench-quick: $(OPS)
	$(PY) bench/dora_layer.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
