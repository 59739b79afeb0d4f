"""broker.acl: the topic rules of docs/protocol.md, table-driven (pure, no broker)."""

from __future__ import annotations

import pytest

from amqtt.contexts import Action

from broker import acl

EDGE = ("edge", "edge")
NODE = ("node", "node.n1")
DEV = ("device", "dev.alice")

SUB, PUB, RECV = "subscribe", "publish", "receive"

ALLOWED = [
    # edge
    (EDGE, PUB, "claw/v1/task/wc.bob"),
    (EDGE, PUB, "claw/v1/task/dev.alice"),
    (EDGE, PUB, "claw/v1/task/mp.o_Abc-123@x.y"),
    (EDGE, SUB, "claw/v1/reply/+"),
    (EDGE, SUB, "claw/v1/node/+"),
    (EDGE, SUB, "claw/v1/task/+"),
    (EDGE, SUB, "claw/v1/reply/wc.bob"),
    (EDGE, SUB, "claw/v1/node/n1"),
    (EDGE, RECV, "claw/v1/reply/wc.bob"),
    (EDGE, RECV, "claw/v1/node/n1"),
    (EDGE, RECV, "claw/v1/task/web.x"),
    # node
    (NODE, SUB, "claw/v1/task/+"),
    (NODE, SUB, "$share/claw/claw/v1/task/+"),
    (NODE, SUB, "claw/v1/task/wc.bob"),
    (NODE, RECV, "claw/v1/task/wc.bob"),
    (NODE, RECV, "claw/v1/task/dev.alice"),
    (NODE, PUB, "claw/v1/reply/wc.bob"),
    (NODE, PUB, "claw/v1/reply/dev.alice"),
    (NODE, PUB, "claw/v1/node/n1"),
    (NODE, PUB, "claw/v1/batch/n1"),
    (EDGE, SUB, "claw/v1/batch/+"),
    (EDGE, RECV, "claw/v1/batch/n1"),
    # device
    (DEV, PUB, "claw/v1/task/dev.alice"),
    (DEV, SUB, "claw/v1/reply/dev.alice"),
    (DEV, RECV, "claw/v1/reply/dev.alice"),
]

DENIED = [
    # wildcards everywhere else
    (EDGE, SUB, "#"),
    (EDGE, SUB, "claw/#"),
    (EDGE, SUB, "claw/v1/#"),
    (EDGE, SUB, "claw/v1/+/wc.bob"),
    (EDGE, SUB, "claw/+/task/+"),
    (EDGE, SUB, "claw/v1/reply/#"),
    (EDGE, SUB, "+/v1/reply/+"),
    (EDGE, SUB, "$SYS/#"),
    (EDGE, SUB, "$share/claw/claw/v1/task/+"),
    (NODE, SUB, "#"),
    (NODE, SUB, "claw/#"),
    (NODE, SUB, "claw/v1/task/#"),
    (NODE, SUB, "$share/other/claw/v1/task/+"),
    (NODE, SUB, "$share/claw/claw/v1/reply/+"),
    (NODE, SUB, "$share/claw/claw/v1/task/wc.bob"),
    (NODE, SUB, "$SYS/broker/uptime"),
    (DEV, SUB, "#"),
    (DEV, SUB, "claw/#"),
    (DEV, SUB, "claw/v1/reply/+"),
    (DEV, SUB, "claw/v1/reply/#"),
    (DEV, SUB, "$share/claw/claw/v1/task/+"),
    # edge may not publish replies or beats, nor to wildcard / malformed topics
    (EDGE, PUB, "claw/v1/reply/wc.bob"),
    (EDGE, PUB, "claw/v1/node/n1"),
    (EDGE, PUB, "claw/v1/task/+"),
    (EDGE, PUB, "claw/v1/task/#"),
    (EDGE, PUB, "claw/v1/task/"),
    (EDGE, PUB, "claw/v1/task"),
    (EDGE, PUB, "claw/v1/task/wc.bob/extra"),
    (EDGE, PUB, "claw/v1/task/bob"),            # no channel
    (EDGE, PUB, "claw/v1/task/xx.bob"),         # unknown channel
    (EDGE, PUB, "claw/v1/task/wc."),            # empty id
    (EDGE, PUB, "claw/v1/task/wc.b ob"),        # bad character
    (EDGE, PUB, "claw/v1/task/wc." + "a" * 200),
    (EDGE, PUB, "claw/v2/task/wc.bob"),         # other version
    (EDGE, PUB, "Claw/v1/task/wc.bob"),
    (EDGE, PUB, "/claw/v1/task/wc.bob"),
    (EDGE, PUB, "claw/v1/other/wc.bob"),
    (EDGE, PUB, "$SYS/x"),
    (EDGE, PUB, ""),
    (EDGE, RECV, "claw/v2/reply/wc.bob"),
    (EDGE, RECV, "other/topic"),
    # node: not tasks, not other nodes' beats, not the subscriber side of replies
    (NODE, PUB, "claw/v1/task/wc.bob"),
    (NODE, PUB, "claw/v1/node/n2"),
    (NODE, PUB, "claw/v1/node/+"),
    (NODE, PUB, "claw/v1/batch/n2"),  # only its own batch topic
    (NODE, PUB, "claw/v1/batch/+"),
    (NODE, SUB, "claw/v1/batch/+"),
    (EDGE, PUB, "claw/v1/batch/n1"),
    (DEV, SUB, "claw/v1/batch/+"),
    (DEV, RECV, "claw/v1/batch/n1"),
    (DEV, PUB, "claw/v1/batch/n1"),
    (NODE, PUB, "claw/v1/reply/+"),
    (NODE, PUB, "claw/v1/reply/bad"),
    (NODE, PUB, "claw/v2/reply/wc.bob"),
    (NODE, SUB, "claw/v1/reply/+"),
    (NODE, SUB, "claw/v1/node/+"),
    (NODE, SUB, "claw/v1/reply/wc.bob"),
    (NODE, RECV, "claw/v1/reply/wc.bob"),
    (NODE, RECV, "claw/v1/node/n2"),
    (NODE, RECV, "claw/v1/task/+"),
    # device: only its own uid, only its side
    (DEV, PUB, "claw/v1/task/dev.bob"),
    (DEV, PUB, "claw/v1/task/wc.alice"),
    (DEV, PUB, "claw/v1/reply/dev.alice"),
    (DEV, PUB, "claw/v1/node/alice"),
    (DEV, PUB, "claw/v1/task/+"),
    (DEV, SUB, "claw/v1/reply/dev.bob"),
    (DEV, SUB, "claw/v1/task/dev.alice"),
    (DEV, SUB, "claw/v1/task/+"),
    (DEV, SUB, "claw/v1/node/+"),
    (DEV, RECV, "claw/v1/reply/dev.bob"),
    (DEV, RECV, "claw/v1/task/dev.alice"),
    (DEV, RECV, "claw/v1/reply/wc.alice"),
    # malformed usernames get nothing
    (("node", "n1"), PUB, "claw/v1/reply/wc.bob"),
    (("node", "node."), PUB, "claw/v1/reply/wc.bob"),
    (("node", "node.a b"), SUB, "claw/v1/task/+"),
    (("node", "dev.alice"), SUB, "claw/v1/task/+"),
    (("device", "alice"), PUB, "claw/v1/task/alice"),
    (("device", "wc.alice"), PUB, "claw/v1/task/wc.alice"),
    (("device", "node.n1"), SUB, "claw/v1/reply/node.n1"),
    (("device", "dev."), PUB, "claw/v1/task/dev."),
    # unknown roles and actions
    (("admin", "edge"), PUB, "claw/v1/task/wc.bob"),
    (("", "edge"), SUB, "claw/v1/reply/+"),
    (("Edge", "edge"), SUB, "claw/v1/reply/+"),
    (EDGE, "unsubscribe", "claw/v1/reply/+"),
    (EDGE, "", "claw/v1/reply/+"),
    (EDGE, "PUBLISH", "claw/v1/task/wc.bob"),
]


@pytest.mark.parametrize(("who", "action", "topic"), ALLOWED)
def test_allowed(who: tuple[str, str], action: str, topic: str) -> None:
    assert acl.allowed(who[0], who[1], topic, action) is True


@pytest.mark.parametrize(("who", "action", "topic"), DENIED)
def test_denied(who: tuple[str, str], action: str, topic: str) -> None:
    assert acl.allowed(who[0], who[1], topic, action) is False


@pytest.mark.parametrize("action", [Action.SUBSCRIBE, Action.PUBLISH, Action.RECEIVE])
def test_amqtt_action_enum_is_accepted(action: Action) -> None:
    topic = "claw/v1/reply/dev.alice" if action != Action.PUBLISH else "claw/v1/task/dev.alice"
    assert acl.allowed("device", "dev.alice", topic, action) is True
    assert acl.allowed("device", "dev.alice", topic.replace("alice", "bob"), action) is False


@pytest.mark.parametrize("bad", [None, 1, b"claw/v1/task/wc.bob", ["claw"], object()])
def test_non_string_inputs_are_denied(bad: object) -> None:
    assert acl.allowed("edge", "edge", bad, PUB) is False  # type: ignore[arg-type]
    assert acl.allowed(bad, "edge", "claw/v1/task/wc.bob", PUB) is False  # type: ignore[arg-type]
    assert acl.allowed("edge", bad, "claw/v1/task/wc.bob", PUB) is False  # type: ignore[arg-type]
    assert acl.allowed("edge", "edge", "claw/v1/task/wc.bob", bad) is False  # type: ignore[arg-type]


def test_huge_topic_is_denied() -> None:
    assert acl.allowed("edge", "edge", "claw/v1/task/wc." + "a" * 70000, PUB) is False


@pytest.mark.parametrize(("who", "topic", "ok"), [
    (NODE, "claw/v1/node/n1", True),
    (NODE, "claw/v1/node/n2", False),
    (NODE, "claw/v1/reply/wc.bob", True),
    (DEV, "claw/v1/task/dev.alice", True),
    (DEV, "claw/v1/reply/wc.bob", False),   # a device forging a reply to another user
    (DEV, "claw/v1/task/wc.bob", False),
    (DEV, "$SYS/x", False),
    (EDGE, "claw/v1/task/wc.bob", True),
    (EDGE, "claw/v1/node/edge", False),
    (DEV, None, False),
])
def test_will_allowed(who: tuple[str, str], topic: str | None, ok: bool) -> None:
    assert acl.will_allowed(who[0], who[1], topic) is ok


def test_topic_plugin_uses_the_role_stored_on_the_session() -> None:
    from amqtt.session import Session

    from broker.plugins import ROLE_KEY
    from broker.plugins.acl import session_allowed

    s = Session()
    s.username = "dev.alice"
    assert session_allowed(s, "claw/v1/task/dev.alice", Action.PUBLISH) is False  # not authenticated: no role
    s.attributes[ROLE_KEY] = "device"
    assert session_allowed(s, "claw/v1/task/dev.alice", Action.PUBLISH) is True
    assert session_allowed(s, "claw/v1/task/dev.bob", Action.PUBLISH) is False
    assert session_allowed(s, "claw/v1/reply/dev.alice", Action.RECEIVE) is True
    assert session_allowed(None, "claw/v1/reply/dev.alice", Action.RECEIVE) is False
    assert session_allowed(s, None, Action.RECEIVE) is False
    assert session_allowed(s, "claw/v1/reply/dev.alice", None) is False
