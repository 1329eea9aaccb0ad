# One command each, on a fresh machine with Python 3.11 and pip:
#   make demo   -> virtualenv + dependencies, then the main job (training on the embedded photos)
#   make test   -> virtualenv + dependencies, then the test suite (CPU only; kernels in the Triton interpreter)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo quick-demo test bench clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[train,test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m training.lpips_weights --fetch
	$(PY) training/train.py --preset rfsq2-ln --max-steps 200 --resume

quick-demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests bench --benchmark-disable --durations=20

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info
