# Two commands do all the set-up: `make train` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: train test install clean-venv

# Re-install when the declared dependencies change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Extra Hydra overrides: make train ARGS="model/pool=avg trainer.max_epochs=3"
train: $(STAMP)
	$(BIN)/cifarlab-train $(ARGS)

# Extra pytest arguments: make test ARGS="-k model -x"
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean-venv:
	rm -rf $(VENV)
