# `make demo` and `make test` each set up .venv on first use and reuse it after. Every install
# takes its versions from constraints.txt, the lock CI last passed with (`make lock` refreshes it).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fibec-installed
LOCK   := constraints.txt
# The CPU wheel on this disk; a bare `torch` would pull a CUDA build of several GB.
TORCH_PIN := torch==2.13.0
# No GPU: run every Triton kernel in the interpreter so tests still exercise it.
GPU    := $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERP := $(if $(filter 1,$(GPU)),,TRITON_INTERPRET=1)
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h)
# The newest releases of every dependency (`make lock`, `make test-latest`), beside .venv.
LATEST := .venv-latest
# Interpreters the package check installs the wheel into and smoke-tests, besides $(PY).
SMOKE_PYTHONS ?= 3.12

.PHONY: setup demo test test-latest lock latest-env package-check bench sanitize clean

setup: $(STAMP)

# The torch already there is kept (a GPU user's CUDA build); else the pinned CPU wheel. The rest
# comes from the lock (package-check/constraints.sh: which lines go with which torch).
$(STAMP): setup.py pyproject.toml $(LOCK) $(EXT_SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIN)
	bash package-check/constraints.sh $(PY) > $(VENV)/constraints.txt
	$(PY) -m pip install -c $(VENV)/constraints.txt -e ".[test]"
	touch $(STAMP)

# A second `make demo` continues the run in $(DEMO_OUT): a finished one only shows its results again.
DEMO_OUT := runs/demo
demo: $(STAMP)
	@if [ -f $(DEMO_OUT)/config.json ]; then \
	    echo "$(DEMO_OUT) holds a run: continuing it (a finished run only shows its results; rm -r $(DEMO_OUT) to start over)"; \
	    HF_HUB_OFFLINE=1 $(VENV)/bin/fibec run --resume $(DEMO_OUT); \
	else HF_HUB_OFFLINE=1 $(VENV)/bin/fibec compare --methods fibecfed,fedavg --out $(DEMO_OUT); fi

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(INTERP) $(PY) -m pytest tests -n 2 -q

# A fresh environment with the newest release of every dependency (torch stays pinned), made anew
# on every call. Not part of CI: it shows a breaking release the day it appears.
latest-env:
	rm -rf $(LATEST) && python3 -m venv $(LATEST)
	$(LATEST)/bin/pip install $(TORCH_PIN)
	echo "$(TORCH_PIN)" > $(LATEST)/constraints.txt
	$(LATEST)/bin/pip install -c $(LATEST)/constraints.txt -e ".[test]"

test-latest: latest-env
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest tests -n 2 -q

# Rewrites the lock with the newest releases. Then `make test` (which installs from it) and
# commit constraints.txt once it passes: CI installs exactly these versions.
lock: latest-env
	{ echo "# The versions CI last passed with (torch aside: Makefile's TORCH_PIN). Made by \`make lock\` on $$(date -u +%F)."; \
	  $(LATEST)/bin/pip freeze --exclude-editable | grep -v '^torch==' | LC_ALL=C sort -f; } > $(LOCK)

# sdist -> wheel built from it -> fresh virtual environment -> smoke test outside the repository.
package-check: $(STAMP)
	bash package-check/check.sh $(PY) $(SMOKE_PYTHONS)

bench: $(STAMP)
	$(PY) -m pip install -c $(VENV)/constraints.txt -e ".[test,bench]"
	$(PY) -m pip install --no-deps backpack-for-pytorch
	HF_HUB_OFFLINE=1 $(PY) -m pytest bench -q --benchmark-columns=median,iqr,rounds

# The codec's C++ under AddressSanitizer and UBSan (by hand, minutes): a copy of the package
# and tests whose extension is built with both, then the codec tests (with the GPU path's bodies,
# under the interpreter) and 20,000 fuzz cases. pybind11's headers come from the build requirement
# of pyproject.toml (pip installs it only in an isolated build environment otherwise).
SANITIZED := build/sanitize
sanitize: $(STAMP)
	$(PY) -c "import pybind11" 2>/dev/null || $(PY) -m pip install -q "$$($(PY) -c "import tomllib; \
	    print(next(r for r in tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'] if r.startswith('pybind11')))")"
	rm -rf $(SANITIZED) && mkdir -p $(SANITIZED) && cp -r fibec tests $(SANITIZED)/ && rm -f $(SANITIZED)/fibec/_codec*.so
	g++ -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	    -shared -fPIC $$($(PY) -m pybind11 --includes) csrc/*.cpp \
	    -o $(SANITIZED)/fibec/_codec$$($(PY) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
	cd $(SANITIZED) && LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
	    ASAN_OPTIONS=detect_leaks=0 PYTHONPATH=. $(INTERP) sh -c '\
	    $(abspath $(PY)) -c "import fibec._codec as c; assert \"$(SANITIZED)\" in c.__file__, c.__file__" && \
	    $(abspath $(PY)) -m pytest -p no:cacheprovider tests/test_codec.py tests/test_codec_on_device.py tests/test_codec_decode_on_device.py -q && $(abspath $(PY)) tests/fuzz_codec.py'

clean:
	rm -rf $(VENV) $(LATEST) build dist *.egg-info
