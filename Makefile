# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) .venv and installs what it needs into it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.yoloq-installed
# On the project's machines these two install from local disk; pinning them keeps pip from pulling another
# multi-GB torch build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test bench bench-qat clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -q nncf
	$(PY) scripts/bench_ptq.py

bench-qat: $(STAMP)
	$(PY) scripts/bench_qat.py

clean:
	rm -rf out .pytest_cache
