# The README's two commands: `make demo` (the main job on embedded defaults) and `make test`.
# TORCH_SPEC is installed before the project so pip takes the CPU build on this disk instead of a
# multi-GB CUDA build; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the versions of the last green run (CI installs exactly these); `make upgrade-deps` refreshes them
CONSTRAINTS ?= constraints.txt
UPGRADE_VENV ?= .venv-upgrade
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo demo-quick test upgrade-deps docs serve schedule bench-selection bench-tune clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m dpsel.demo --out $(DEMO_DIR)

# The same job on 600 rows with fewer steps: about 1.5 min on 2 free cores (measured CPU time).
demo-quick: venv
	$(PY) -m dpsel.demo --quick --out $(DEMO_DIR)-quick

# Two xdist workers, one per core of the CI runner (tests/conftest.py: a file's tests share a worker, the Prefect
# and Ray tests share one, and each worker's torch takes one thread); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

# Re-resolve the newest versions pyproject.toml's ranges allow in a fresh venv, run the whole suite there, and
# only when it is green write them to $(CONSTRAINTS) (then `make test` reinstalls from it). A red run leaves
# $(CONSTRAINTS) as it was and $(UPGRADE_VENV) in place to look into.
upgrade-deps:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade pip
	$(UPGRADE_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade -e '.[test]'
	$(UPGRADE_VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup
	{ sed -n '1,/^[^#]/{/^#/p}' $(CONSTRAINTS); $(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '^(torch|nvidia-|triton|dpsel)([=@ ]|$$)'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(UPGRADE_VENV)

# The reference under docs/ as a site (the suite builds it with --strict too).
docs: venv
	$(PY) -m mkdocs build --strict --site-dir site

# A real Prefect server with its UI at http://127.0.0.1:4200 (see docs/flows.md, "Scheduled curation").
serve: venv
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

# Serve the deployments of schedules.yaml on their cron schedules against PREFECT_API_URL.
schedule: venv
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(PY) -m flows.serve schedules.yaml

bench-selection: venv
	$(PY) benchmarks/selection.py

bench-tune: venv
	$(PY) benchmarks/tune.py

clean:
	rm -rf runs .prefect .pytest_cache site $(UPGRADE_VENV)
