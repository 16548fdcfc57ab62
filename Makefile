# Two entry points; both create the environment from requirements.txt when it is missing or stale.
#   make demo   the main job on its built-in demo
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench env clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) bench/dora_layer.py --quick

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/dora_layer.py

clean:
	rm -rf $(VENV) .pytest_cache
