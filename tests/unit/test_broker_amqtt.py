"""amqtt is pinned exactly, and every amqtt member broker/amqtt_overrides.py overrides or reads is still there.

broker/amqtt_overrides.py replaces private methods of amqtt's ``Broker`` and ``BrokerProtocolHandler`` and reads
their private state. An amqtt upgrade that renames or reshapes any of them must fail here, loudly, not change
the broker's behaviour silently: the installed version must equal the pin in pyproject.toml, each overridden
member must exist with the parameters it had, and no other module of broker/ may touch amqtt's private members.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import re
import tomllib
from pathlib import Path

import pytest
from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.session import Session

from broker.amqtt_overrides import AmqttBroker, ClawHandler
from broker.clawbroker import ClawBroker

ROOT = Path(__file__).resolve().parents[2]

# amqtt member -> its parameters in amqtt 0.12.1 (names only: annotations render differently across Pythons)
OVERRIDDEN: dict[tuple[type, str], str] = {
    (Broker, "_split_bindaddr_port"): "(port_str, default_port)",
    (Broker, "_create_server_instance"): "(self, listener_name, listener_type, address, port, ssl_context)",
    (Broker, "_start_listeners"): "(self)",
    (Broker, "stream_connected"): "(self, reader, writer, listener_name)",
    (Broker, "_client_connected"): "(self, listener_name, reader, writer)",
    (Broker, "_initialize_client_session"): "(self, reader, writer, remote_address, remote_port)",
    (Broker, "_authenticate"): "(self, session, _)",
    (Broker, "_handle_message_delivery"): "(self, client_session, handler, wait_deliver)",
    (Broker, "_topic_filtering"): "(self, session, topic, action)",
    (Broker, "_broadcast_loop"): "(self)",
    (Broker, "_run_broadcast"): "(self, running_tasks)",
    (Broker, "_handle_client_session"): "(self, reader, writer, client_session, handler, server, listener_name)",
    (Broker, "_handle_disconnect"): "(self, client_session, handler, disconnect_waiter)",
    (Broker, "add_subscription"): "(self, subscription, session)",
    (Broker, "retain_message"): "(self, source_session, topic_name, data, qos=None)",
    (Broker, "_publish_retained_messages_for_subscription"): "(self, subscription, session)",
    (Broker, "_publish_session_retained_messages"): "(self, session)",
    (Broker, "start"): "(self)",
    (Broker, "shutdown"): "(self)",
    (BrokerProtocolHandler, "handle_read_timeout"): "(self)",
    (BrokerProtocolHandler, "handle_publish"): "(self, publish_packet)",
}
# amqtt members the overrides call (their behaviour is relied on, not replaced)
CALLED: dict[tuple[type, str], str] = {
    (Broker, "_get_handler"): "(self, session)",
    (Broker, "_stop_handler"): "(self, handler)",
    (Broker, "_delete_session"): "(self, client_id)",
    (Broker, "_del_all_subscriptions"): "(self, session)",
    (Broker, "_matches"): "(self, topic, a_filter)",
    (BrokerProtocolHandler, "init_from_connect"): "(reader, writer, plugins_manager, loop=None)",
    (BrokerProtocolHandler, "handle_connection_closed"): "(self)",
}
# private state the overrides read or replace: (class, attribute its __init__ sets)
STATE: list[tuple[type, str]] = [
    (Broker, "_sessions"), (Broker, "_servers"), (Broker, "_subscriptions"), (Broker, "_broadcast_queue"),
    (Broker, "_tasks_queue"), (Broker, "_broadcast_shutdown_waiter"),
    (ProtocolHandler, "_puback_waiters"), (StreamWriterAdapter, "_writer"),
]


def _params(member: object) -> str:
    sig = inspect.signature(member)  # type: ignore[arg-type]
    return "(" + ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in sig.parameters.values()) + ")"


def test_installed_amqtt_is_the_pinned_version() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"amqtt\s*==", d)]
    assert len(pins) == 1, f"pyproject.toml must pin amqtt exactly (amqtt==X.Y.Z), found {deps}"
    pinned = pins[0].split("==", 1)[1].strip()
    assert importlib.metadata.version("amqtt") == pinned, "amqtt upgraded: review broker/amqtt_overrides.py first"


@pytest.mark.parametrize(("owner", "name"), [*OVERRIDDEN, *CALLED], ids=lambda x: getattr(x, "__name__", x))
def test_amqtt_members_we_depend_on_keep_their_parameters(owner: type, name: str) -> None:
    member = getattr(owner, name, None)
    assert member is not None, f"amqtt {owner.__name__}.{name} is gone"
    assert _params(member) == {**OVERRIDDEN, **CALLED}[owner, name], f"amqtt {owner.__name__}.{name} changed"


@pytest.mark.parametrize(("owner", "name"), STATE, ids=lambda x: getattr(x, "__name__", x))
def test_amqtt_private_state_we_read_is_still_set(owner: type, name: str) -> None:
    assert re.search(rf"self\.{name}\b\s*(:[^=]+)?=", inspect.getsource(owner.__init__)), \
        f"amqtt {owner.__name__}.__init__ no longer sets {name}"


def test_every_override_is_listed_here() -> None:
    ours = [(AmqttBroker, Broker), (ClawBroker, Broker), (ClawHandler, BrokerProtocolHandler)]
    found = {(base, name) for cls, base in ours for name in vars(cls)
             if not name.startswith("__") and callable(getattr(base, name, None))}
    assert found == set(OVERRIDDEN), "an override of amqtt is missing from OVERRIDDEN (or one was removed)"


def test_only_amqtt_overrides_overrides_amqtts_private_members() -> None:
    private = {n for n in vars(ClawBroker) if n.startswith("_") and not n.startswith("__") and hasattr(Broker, n)}
    assert not private, f"broker/clawbroker.py overrides amqtt's private {sorted(private)}: move to amqtt_overrides"


def _amqtt_private_names() -> set[str]:
    names: set[str] = set()
    for cls in (Broker, BrokerProtocolHandler, ProtocolHandler, StreamWriterAdapter, ReaderAdapter, WriterAdapter,
                Session):
        names |= {n for n in dir(cls) if n.startswith("_") and not n.startswith("__")}
        names |= set(re.findall(r"self\.(_[a-z]\w*)", inspect.getsource(cls)))
    return names


def test_no_other_broker_module_touches_amqtts_private_members() -> None:
    private = _amqtt_private_names()
    bad = []
    for path in sorted((ROOT / "broker").rglob("*.py")):
        if path.name == "amqtt_overrides.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = {t.attr for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Attribute)}
        own |= {c.value for n in ast.walk(tree) if isinstance(n, ast.Assign)  # __slots__ = ("_writer", ...)
                and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in n.targets)
                for c in ast.walk(n.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private and node.attr not in own:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not bad, "amqtt's private members outside broker/amqtt_overrides.py:\n  " + "\n  ".join(bad)


def test_bracketed_ipv6_bind_address_loses_its_brackets() -> None:
    """amqtt kept "[::1]" from "[::1]:0", which asyncio.start_server cannot bind."""
    assert Broker._split_bindaddr_port("[::1]:0", 1883)[0] == "[::1]"  # the amqtt behaviour replaced
    assert AmqttBroker._split_bindaddr_port("[::1]:0", 1883) == ("::1", 0)
    assert AmqttBroker._split_bindaddr_port("127.0.0.1:1884", 1883) == ("127.0.0.1", 1884)
