"""Log lines an outsider can cause at will are bounded: core.guard.LogBudget and the amqtt logger filter."""

from __future__ import annotations

import logging

import pytest

from broker.logfilters import install_log_filter
from core.guard import LogBudget


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_budget_allows_a_burst_then_the_rate_and_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = LogBudget(logging.getLogger("test.budget"), per_minute=6, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, "test.budget"):
        logged = [budget.log(logging.WARNING, "refused %s", f"user{i}") for i in range(100)]
        assert logged.count(True) == 3 and budget.suppressed == 97
        clock.t += 10  # one line's worth at 6 a minute
        assert budget.log(logging.WARNING, "refused %s", "late")
        assert not budget.log(logging.WARNING, "refused %s", "later")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["refused user0", "refused user1", "refused user2"]
    assert lines[3] == "refused late (97 similar lines left out before this one)"
    assert len(lines) == 4


def test_amqtt_warnings_are_bounded_per_logger(caplog: pytest.LogCaptureFixture) -> None:
    """amqtt logs some client-caused events once per connection with the exception in the text (a corrupt TLS
    record: "Unhandled exception in reader coro"); at most 10 at once and 5 a minute get through."""
    import amqtt.mqtt.protocol.handler  # noqa: F401  (the logger exists once amqtt is imported)

    install_log_filter()
    name = "amqtt.mqtt.protocol.handler"
    with caplog.at_level(logging.INFO, name):
        for i in range(200):
            logging.getLogger(name).warning(f"BrokerProtocolHandler Unhandled exception in reader coro: {i!r}")
        logging.getLogger(name).info("an INFO line is not counted")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == name]
    assert 1 <= len(warnings) <= 12
    assert any(r.getMessage() == "an INFO line is not counted" for r in caplog.records)
