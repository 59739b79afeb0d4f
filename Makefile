# The two commands of README.md:  `make demo` (whole system on this machine)  and  `make test` (all tests).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
LOCK    := requirements.lock
# The stamp names a hash of pyproject.toml and the lock: changing either reinstalls.
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)

.PHONY: demo test install system-deps bench-smoke lock clean

# Dependencies come only from the lock (exact versions, sha256 of every file; scripts/lock.sh regenerates it),
# then SmartClaw itself without resolving anything (--no-deps) with the locked setuptools (--no-build-isolation).
# `pip check` fails when pyproject.toml names a dependency the lock lacks (run scripts/lock.sh).
$(STAMP): pyproject.toml $(LOCK)
	@PY=$(PY) scripts/system-deps.sh venv
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
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

lock:
	@PY=$(PY) scripts/lock.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
