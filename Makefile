# make train / make test create .venv from requirements.txt when it is missing (or older than it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv train test test-slow bench clean

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

bench: venv
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf saved/ .pytest_cache/
