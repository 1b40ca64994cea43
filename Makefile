# make train / make test create .venv from requirements.txt when it is missing (or older than it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv train test test-slow test-slurm bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) train.py -c config.json

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

# A one-node SLURM cluster on this machine (root; installs slurm-wlm and munge with apt-get where missing),
# then slurm/train.sbatch warned, requeued and resumed on it. Stop the cluster: tests/parts/slurm/start_slurm.sh --stop
SLURM_DIR ?= /tmp/slurm-test
test-slurm: venv
	tests/parts/slurm/start_slurm.sh $(SLURM_DIR)
	SLURM_CONF=$(SLURM_DIR)/slurm.conf $(PY) -m pytest -q -m slurm -s tests/parts/test_slurm.py

bench: venv
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf saved/ .pytest_cache/
