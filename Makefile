# `make demo` and `make test` each set up .venv on first use and reuse it after.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fibec-installed
# No GPU: run every Triton kernel in the interpreter so tests still exercise it.
GPU    := $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERP := $(if $(filter 1,$(GPU)),,TRITON_INTERPRET=1)
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: setup demo test package-check bench sanitize clean

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

# sdist -> wheel built from it -> fresh virtual environment -> smoke test outside the repository.
package-check: $(STAMP)
	bash packaging/check.sh $(PY)

bench: $(STAMP)
	$(PY) -m pip install -c $(VENV)/torch-pin.txt -e ".[test,bench]"
	$(PY) -m pip install --no-deps backpack-for-pytorch
	HF_HUB_OFFLINE=1 $(PY) -m pytest bench -q --benchmark-columns=median,iqr,rounds

# The codec's C++ under AddressSanitizer and UBSan (by hand, minutes): a copy of the package
# and tests whose extension is built with both, then the codec tests and 20,000 fuzz cases.
SANITIZED := build/sanitize
sanitize: $(STAMP)
	rm -rf $(SANITIZED) && mkdir -p $(SANITIZED) && cp -r fibec tests $(SANITIZED)/ && rm -f $(SANITIZED)/fibec/_codec*.so
	g++ -std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
	    -shared -fPIC $$($(PY) -m pybind11 --includes) csrc/*.cpp \
	    -o $(SANITIZED)/fibec/_codec$$($(PY) -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
	cd $(SANITIZED) && LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
	    ASAN_OPTIONS=detect_leaks=0 PYTHONPATH=. $(INTERP) sh -c '\
	    $(abspath $(PY)) -c "import fibec._codec as c; assert \"$(SANITIZED)\" in c.__file__, c.__file__" && \
	    $(abspath $(PY)) -m pytest -p no:cacheprovider tests/test_codec.py -q && $(abspath $(PY)) tests/fuzz_codec.py'

clean:
	rm -rf $(VENV) build dist *.egg-info
