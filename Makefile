# Two commands do all the set-up: `make train` and `make test` create .venv on first use. The first time downloads
# about 2.6 GB (torch and NVIDIA's CUDA libraries; pip shows its progress) into 5.9 GB of .venv. Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOGDIR ?= outputs

.PHONY: train test test-fast tensorboard install clean-venv

# Re-install when the declared dependencies change.
$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else f"error: cifarlab needs Python 3.11 or newer; $(PYTHON) is {v.major}.{v.minor} (give another: make PYTHON=python3.11 ...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Extra Hydra overrides: make train ARGS="model/pool=avg trainer.max_epochs=3"
train: $(STAMP)
	$(BIN)/cifarlab-train $(ARGS)

# Extra pytest arguments: make test ARGS="-k model -x". CI runs make test: every test.
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The edit loop (about 2 min on 2 cores): every test but those marked slow (end-to-end runs, the measuring tools)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

# TensorBoard on outputs/ (or LOGDIR=<a run or sweep folder>), on 127.0.0.1 and a free port it prints first
tensorboard: $(STAMP)
	$(BIN)/cifarlab-tensorboard $(LOGDIR) $(ARGS)

clean-venv:
	rm -rf $(VENV)
