"""Logging filters for amqtt's loggers: health-check noise and counted events demoted to DEBUG, floods bounded.

:func:`install_log_filter` installs them once per process (:func:`broker.app.run_broker` calls it).
"""

from __future__ import annotations

import logging

from core.guard import LogBudget


class _HealthCheckNoise(logging.Filter):
    """Demote amqtt's ERROR/WARNING lines for connections that never sent a CONNECT to DEBUG."""

    _PREFIXES = ("No data from", "Failed to initialize client session: No more data",
                 "Failed to initialize client session: No data")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and isinstance(record.msg, str) and \
                record.msg.startswith(self._PREFIXES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class _HandlerNoise(logging.Filter):
    """Demote amqtt's per-event lines that ClawBroker counts and logs rate-limited itself (a PUBACK timeout per
    message; the close after an oversize or malformed packet) to DEBUG."""

    _MARKS = ("Timeout waiting for PUBACK", "PacketTooLargeError", "ProtocolViolation")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and isinstance(record.msg, str) and \
                any(m in record.msg for m in self._MARKS):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class _AmqttFlood(logging.Filter):
    """At most 5 WARNING-or-worse lines a minute per amqtt logger and level (10 at once): amqtt logs some
    events a client can repeat at will (a corrupt TLS record, a protocol error) once per connection, with the
    exception in the text. Lines left out are counted in the next line let through."""

    def __init__(self) -> None:
        super().__init__()
        self._budgets: dict[int, LogBudget] = {}  # per level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        budget = self._budgets.get(record.levelno)
        if budget is None:
            budget = self._budgets[record.levelno] = LogBudget(None, per_minute=5, burst=10)
        left_out = budget.take()
        if left_out is None:
            return False
        if left_out:
            record.msg = f"{record.getMessage()} ({left_out} similar lines left out before this one)"
            record.args = None
        return True


def install_log_filter() -> None:
    """Demote health-check noise on ``amqtt.broker`` and counted events on amqtt's protocol handler; quiet
    ``transitions`` (INFO lines on every CONNECT) unless the application configured that logger itself."""
    amqtt_log = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, _HealthCheckNoise) for f in amqtt_log.filters):
        amqtt_log.addFilter(_HealthCheckNoise())
    handler_log = logging.getLogger("amqtt.mqtt.protocol.handler")
    if not any(isinstance(f, _HandlerNoise) for f in handler_log.filters):
        handler_log.addFilter(_HandlerNoise())
    for name in [n for n in list(logging.root.manager.loggerDict) if n == "amqtt" or n.startswith("amqtt.")]:
        amqtt_logger = logging.getLogger(name)
        if not any(isinstance(f, _AmqttFlood) for f in amqtt_logger.filters):
            amqtt_logger.addFilter(_AmqttFlood())  # after the demotions above
    transitions_log = logging.getLogger("transitions")
    if transitions_log.level == logging.NOTSET:
        transitions_log.setLevel(logging.WARNING)
