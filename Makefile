# The two commands of README.md:  `make demo` (whole system on this machine)  and  `make test` (all tests).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: demo test install system-deps bench-smoke clean

$(STAMP): pyproject.toml
	@PY=$(PY) scripts/system-deps.sh venv
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/claw demo $(ARGS)

system-deps:
	@PY=$(PY) scripts/system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q $(ARGS)

bench-smoke: $(STAMP) system-deps
	$(BIN)/claw bench smoke

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
