# Set-up on a fresh machine is two commands: `make demo` and `make test`.
# Both create .venv (if absent) and install medtl with its dependencies into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medtl-installed
# torch / torchvision releases this machine installs from local files; override elsewhere.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint typecheck pytest clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev,imagenet,export]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medtl demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check medtl tests benchmarks
	$(VENV)/bin/ruff format --check medtl tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy medtl

pytest: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
