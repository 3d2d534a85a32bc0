# `make demo` and `make test` each set up .venv on first use and reuse it after.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fibec-installed
# No GPU: run every Triton kernel in the interpreter so tests still exercise it.
GPU    := $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERP := $(if $(filter 1,$(GPU)),,TRITON_INTERPRET=1)
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml $(EXT_SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	# Keep whatever torch is there (a GPU user's CUDA build); else the CPU wheel on disk.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt
	$(PY) -m pip install -c $(VENV)/torch-pin.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/fibec compare --methods fibecfed,fedavg --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(INTERP) $(PY) -m pytest tests -n 2 -q

bench: $(STAMP)
	$(PY) -m pip install -c $(VENV)/torch-pin.txt -e ".[test,bench]"
	$(PY) -m pip install --no-deps backpack-for-pytorch
	HF_HUB_OFFLINE=1 $(PY) -m pytest bench -q --benchmark-columns=median,iqr,rounds

clean:
	rm -rf $(VENV) build *.egg-info
