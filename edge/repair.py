"""Stream repair: when to ask a node to replay a task's replies, and when to give up on it.

Repairs reply streams the broker broke (amqtt drops QoS 1 messages unacknowledged for 5 s, a broker may restart):
the node is asked to replay from the first missing seq (``Task.replay``)

- when a gap (a later chunk, or a Done naming more chunks, arrived) is ``GAP_WAIT_S`` old, and
- when a running task has been silent for ``IDLE_ASK_S`` (its last chunk or its Done was lost).

A node that has the task re-sends Accept + the missing chunks (+ Done); one that no longer has it ignores the
request: after ``REPAIR_ASKS`` unanswered requests the task is given up (the bridge ends it with ``node_lost`` and
the in-order text already shown, never with a hole in the middle). A task queued at its node is asked far less
often (``QUEUED_ASK_S``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import wire

from .tasks import LiveTask

GAP_WAIT_S = 1.0  # a gap in a reply stream held this long is asked to be replayed (then again, this often)
IDLE_ASK_S = 10.0  # a running task silent this long is asked to replay from its next seq (a lost tail or Done)
QUEUED_ASK_S = 60.0  # a task queued at its node, silent this long, is asked too (its replies may all be lost)
REPAIR_ASKS = 5  # unanswered replay requests before the task ends with node_lost (the node no longer has it)


def scan(tasks: Iterable[LiveTask], now: float, ask: Callable[[LiveTask], None],
         give_up: Callable[[LiveTask], None]) -> None:
    """One pass over the unfinished ``tasks``: ``ask`` for those due a replay request (counted here),
    ``give_up`` on those asked REPAIR_ASKS times in vain."""
    for live in tasks:
        st = live.stream
        if live.finished_at is not None or st.state is wire.State.PENDING:
            continue
        if st.missing:
            if not live.gap_at:
                live.gap_at = now
            due = now - max(live.gap_at, live.asked_at) >= GAP_WAIT_S
        else:
            live.gap_at = 0.0
            # running (streaming, or accepted with queue 0): after IDLE_ASK_S of silence; queued at the node:
            # far less often (it answers with its Accept, so this costs two small messages a minute)
            wait = IDLE_ASK_S if st.state is wire.State.STREAMING or not st.queue else QUEUED_ASK_S
            due = now - max(live.heard_at, live.asked_at) >= wait
        if not due:
            continue
        if live.asks >= REPAIR_ASKS:
            give_up(live)
            continue
        live.asked_at = now
        live.asks += 1
        ask(live)
