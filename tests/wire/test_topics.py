"""wire topics: builders, parse_topic, uid / node id validation (and agreement with the message types)."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

import wire
from wire import (
    CHANNELS, NODE_FILTER, PREFIX, REPLY_FILTER, SHARED_TASK_FILTER, TASK_FILTER, TopicInfo, WireError,
    check_node_id, check_uid, is_node_id, is_uid, node_topic, parse_topic, reply_topic, task_topic,
)
from wire_samples import ID, budget

GOOD_UIDS = [
    "wc.zhangsan", "mp.oABC-123_xyz", "dev.kitchen", "web.s1", "wc.a", "wc.a.b", "wc..", "wc.@", "dev.a_b-c@d.e",
    "web." + "x" * 124,  # exactly 128
]
BAD_UIDS: list[Any] = [
    "", "wc", "wczhangsan", "xx.a", "WC.a", "Wc.a", "wc.", ".a", ".", "dev.", "web", "mq.a", "wc-a", "wc_a",
    "web." + "x" * 125,  # 129
    "wc." + "x" * 1000,
    "wc.a/b", "wc.a/", "/wc.a", "wc.+", "wc.a+", "+", "wc.#", "#", "wc.a b", " wc.a", "wc.a ", "wc.\t",
    "wc.张三", "wc.é", "wc.ａ",  # full-width a
    "wc.a\x00", "\x00", "wc.a\n", "wc.a\r\n", "\nwc.a", "wc.$", "wc.a:b", "wc.a,b", "wc.a*",
    None, 1, b"wc.a", ["wc.a"],
]
GOOD_NODES = ["node-1", "n", "GPU_box_2", "a" * 64, "0", "-", "_"]
BAD_NODES: list[Any] = ["", "a" * 65, "node.1", "node 1", "node/1", "node+", "#", "nöde", "node\n", "node\x00",
                        None, 7, b"node"]


# --------------------------------------------------------------------------------------------- constants

def test_constants() -> None:
    assert PREFIX == "claw/v1"
    assert TASK_FILTER == "claw/v1/task/+"
    assert REPLY_FILTER == "claw/v1/reply/+"
    assert NODE_FILTER == "claw/v1/node/+"
    assert SHARED_TASK_FILTER == "$share/claw/claw/v1/task/+"
    assert CHANNELS == {"wc", "mp", "dev", "web"}
    assert str(wire.WIRE_MAJOR) == PREFIX.removeprefix("claw/v")


# --------------------------------------------------------------------------------------------- builders

@pytest.mark.parametrize("uid", GOOD_UIDS)
def test_task_and_reply_topics_round_trip(uid: str) -> None:
    assert is_uid(uid)
    assert check_uid(uid) == uid
    assert task_topic(uid) == f"claw/v1/task/{uid}"
    assert reply_topic(uid) == f"claw/v1/reply/{uid}"
    assert parse_topic(task_topic(uid)) == TopicInfo("task", uid)
    assert parse_topic(reply_topic(uid)) == TopicInfo("reply", uid)


@pytest.mark.parametrize("node", GOOD_NODES)
def test_node_topic_round_trip(node: str) -> None:
    assert is_node_id(node)
    assert check_node_id(node) == node
    assert node_topic(node) == f"claw/v1/node/{node}"
    assert parse_topic(node_topic(node)) == TopicInfo("node", node)


@pytest.mark.parametrize("uid", BAD_UIDS, ids=repr)
def test_bad_uids_rejected_everywhere(uid: Any) -> None:
    assert not is_uid(uid)
    for build in (check_uid, task_topic, reply_topic):
        with pytest.raises(WireError) as info:
            build(uid)
        assert info.value.hint == "bad_uid"
    if isinstance(uid, str):
        for kind in ("task", "reply"):
            with pytest.raises(WireError):
                parse_topic(f"claw/v1/{kind}/{uid}")


@pytest.mark.parametrize("node", BAD_NODES, ids=repr)
def test_bad_node_ids_rejected_everywhere(node: Any) -> None:
    assert not is_node_id(node)
    for build in (check_node_id, node_topic):
        with pytest.raises(WireError) as info:
            build(node)
        assert info.value.hint == "bad_node"
    if isinstance(node, str):
        with pytest.raises(WireError):
            parse_topic(f"claw/v1/node/{node}")


def test_topic_info_is_a_frozen_value() -> None:
    info = parse_topic("claw/v1/task/wc.a")
    assert info.kind == "task" and info.key == "wc.a"
    with pytest.raises(AttributeError):
        info.kind = "reply"  # type: ignore[misc]
    assert hash(info) == hash(TopicInfo("task", "wc.a"))


# --------------------------------------------------------------------------------------------- parse_topic

@pytest.mark.parametrize("topic", [
    TASK_FILTER, REPLY_FILTER, NODE_FILTER, SHARED_TASK_FILTER,  # filters are not topics
    "claw/v1/task/#", "claw/v1/#", "claw/+/task/wc.a", "+/v1/task/wc.a", "claw/v1/+/wc.a", "#",
    "$share/claw/claw/v1/task/wc.a", "$SYS/broker/uptime", "$share/g/claw/v1/reply/wc.a",
    "claw/v2/task/wc.a", "claw/v0/task/wc.a", "claw/V1/task/wc.a", "claw/1/task/wc.a", "claw/v1.0/task/wc.a",
    "Claw/v1/task/wc.a", "clawx/v1/task/wc.a", "smartclaw/v1/task/wc.a",
    "claw/v1/tasks/wc.a", "claw/v1/Task/wc.a", "claw/v1/answer/wc.a", "claw/v1/cancel/wc.a",
    "claw/v1/task/wc.a/extra", "claw/v1/task/wc.a/", "/claw/v1/task/wc.a", "claw//v1/task/wc.a",
    "claw/v1/task", "claw/v1/task/", "claw/v1", "claw", "", "/", "//", "claw/v1/node/node-1/x",
    "claw/v1/task/wc.a\x00", "claw/v1/reply/wc.a\n", " claw/v1/task/wc.a", "claw/v1/task/wc.a ",
    "claw/v1/node/wc.a",  # a uid is not a node id (no dots)
    "claw/v1/task/node-1",  # a node id is not a uid
])
def test_parse_topic_rejects(topic: str) -> None:
    with pytest.raises(WireError):
        parse_topic(topic)


@pytest.mark.parametrize("topic", [None, b"claw/v1/task/wc.a", 1, ["claw", "v1", "task", "wc.a"]])
def test_parse_topic_rejects_non_strings(topic: Any) -> None:
    with pytest.raises(WireError) as info:
        parse_topic(topic)
    assert info.value.hint == "bad_topic"


def test_parse_topic_error_message_is_bounded() -> None:
    with pytest.raises(WireError) as info:
        parse_topic("x/" * 100_000)
    assert len(str(info.value)) < 1000


# --------------------------------------------------------------------------------------------- properties

uid_chars = st.sampled_from("abcXYZ019_.@-")
any_text = st.text(st.characters(codec="utf-8"), max_size=140) | st.text(
    st.sampled_from("abwcmpdevweb._@-/+# \n\x00é"), max_size=140)
uids = st.builds(lambda ch, rest: f"{ch}.{rest}", st.sampled_from(sorted(CHANNELS)),
                 st.text(uid_chars, min_size=1, max_size=140 - 4))


@budget(300)
@given(uid=uids | any_text)
def test_uid_rules_agree_with_message_validation(uid: str) -> None:
    """is_uid (topics, ACLs) and the Task.uid constraint (codec) must accept exactly the same strings."""
    body = {"v": 1, "t": "task", "id": ID, "uid": uid, "ch": "wc", "text": "", "ts": 0}
    try:
        msg = wire.decode(cbor2.dumps(body))
    except WireError:
        decoded = False
    else:
        decoded = True
        assert msg.uid == uid  # type: ignore[union-attr]
    assert decoded == is_uid(uid)
    if is_uid(uid):
        assert parse_topic(task_topic(uid)) == TopicInfo("task", uid)
        assert parse_topic(reply_topic(uid)) == TopicInfo("reply", uid)
        assert len(uid) <= 128
    else:
        with pytest.raises(WireError):
            task_topic(uid)


@budget(200)
@given(node=st.text(st.sampled_from("aZ09_-. /+é\n"), max_size=70) | any_text)
def test_node_id_rules_agree_with_message_validation(node: str) -> None:
    body = {"v": 1, "t": "beat", "node": node, "state": "online"}
    try:
        wire.decode(cbor2.dumps(body))
    except WireError:
        decoded = False
    else:
        decoded = True
    assert decoded == is_node_id(node)
    if is_node_id(node):
        assert parse_topic(node_topic(node)) == TopicInfo("node", node)


@budget(300)
@given(topic=st.text(st.sampled_from("clawv1/taskreplynode+#$share.wc-x\x00 "), max_size=40) | any_text)
def test_parse_topic_total(topic: str) -> None:
    """parse_topic either returns a TopicInfo that rebuilds the same topic, or raises WireError."""
    try:
        info = parse_topic(topic)
    except WireError:
        return
    rebuilt = {"task": task_topic, "reply": reply_topic, "node": node_topic}[info.kind](info.key)
    assert rebuilt == topic
    assert "+" not in topic and "#" not in topic and not topic.startswith("$")
