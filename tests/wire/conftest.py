"""pytest hooks for the wire/ tests (helpers live in wire_samples.py)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true", default=False,
                     help="rewrite tests/wire/golden/*.cbor from the current encoder, then review the git diff")
