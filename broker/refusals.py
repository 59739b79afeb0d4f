"""What the embedded broker refuses at the door, counted and logged within a budget.

:class:`Refusals` owns the broker's :class:`core.guard.Counters` (one set for the whole broker: the auth plugin,
the packet reader and every outbox count into it too, and the edge's ``/metrics`` reads it) and decides and
reports two refusals itself:

- a connection above ``broker.max_connections`` / ``broker.max_connections_per_ip``: closed at once (amqtt's own
  ``max_connections`` made extra clients hang), one WARNING at most once a minute per kind;
- a client id that does not belong to the credential (:func:`core.guard.client_id_ok`): CONNACK 2, at most 20
  WARNING lines a minute.

Its :class:`core.guard.RateLimitedLog` is shared with :class:`broker.reader.PacketReader` (oversize packets,
protocol violations).
"""

from __future__ import annotations

import logging

from core.guard import CLIENT_ID_RULE, ConnectionLimiter, Counters, LogBudget, RateLimitedLog

log = logging.getLogger(__name__)


class Refusals:
    """Connection caps and client-id refusals of one broker, with its counters and log budgets."""

    def __init__(self, *, max_connections: int = 0, max_connections_per_ip: int = 0) -> None:
        self.counters = Counters()
        self.ratelog = RateLimitedLog(log)
        self._client_id_log = LogBudget(log)  # refused client ids: 20 lines a minute at most
        self._limiter = ConnectionLimiter(max_connections, max_connections_per_ip)
        self.ended = 0  # admitted connections that have ended (the broker is done with them, logging included)

    def admit(self, ip: str, peer: str, listener_name: str) -> bool:
        """Count a new connection from ``ip``; False (counted and logged) if a cap is reached: close it at once.
        Every admitted connection is :meth:`release`\\ d when it ends."""
        refused = self._limiter.acquire(ip)
        if refused is None:
            return True
        if refused == "global":
            self.counters.conn_refused_global += 1
            what = f"broker.max_connections={self._limiter.max_total} reached"
        else:
            self.counters.conn_refused_ip += 1
            what = f"broker.max_connections_per_ip={self._limiter.max_per_ip} reached for {ip}"
        self.ratelog.log("conn-" + refused, logging.WARNING, "connection from %s on %r closed: %s",
                         peer, listener_name, what)
        return False

    @property
    def open(self) -> int:
        """Admitted connections not yet ended."""
        return self._limiter.total

    def release(self, ip: str) -> None:
        self._limiter.release(ip)
        self.ended += 1

    def client_id(self, username: str, client_id: str | None, remote_address: str, remote_port: int) -> None:
        """A CONNECT whose client id is not one of ``username``'s: counted and logged (CONNACK 2 follows)."""
        self.counters.client_id_refused += 1
        self._client_id_log.log(
            logging.WARNING, "MQTT CONNECT refused (CONNACK 2, identifier rejected): user %r, client id %r "
            "from %s:%s: %s", username[:100], (client_id or "")[:100], remote_address, remote_port, CLIENT_ID_RULE)
