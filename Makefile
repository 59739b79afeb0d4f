# The two commands of README.md:  `make demo` (whole system on this machine)  and  `make test` (all tests).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
LOCK    := requirements.lock
# The stamp names a hash of pyproject.toml and the lock: changing either reinstalls.
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)

.PHONY: demo test install system-deps bench-smoke lock clean jest

# The mini-program's jest suite (miniapp/): `npm ci` only when package-lock.json changed (a stamp inside
# node_modules, which npm ci recreates), then jest. `make test` runs it before pytest; `make test JEST=0` skips it.
JEST      ?= 1
NPM_STAMP := miniapp/node_modules/.installed-$(shell cat miniapp/package-lock.json 2>/dev/null | sha1sum | cut -c1-12)

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

$(NPM_STAMP): miniapp/package.json miniapp/package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "make: npm (Node.js 18+) is needed for the mini-program tests (apt-get install nodejs npm)" >&2; exit 1; }
	cd miniapp && npm ci --no-audit --no-fund --loglevel=error
	@touch $(NPM_STAMP)

jest: $(NPM_STAMP)
	cd miniapp && npx --no-install jest --ci

test: $(STAMP) system-deps $(if $(filter 1,$(JEST)),jest)
	$(BIN)/python -m pytest -q $(ARGS)

bench-smoke: $(STAMP) system-deps
	$(BIN)/claw bench smoke

lock:
	@PY=$(PY) scripts/lock.sh $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis miniapp/node_modules
