"""wire/'s public surface and its sans-IO promise (no asyncio, sockets, logging, clocks or threads)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import wire

WIRE_DIR = Path(wire.__file__).parent
FORBIDDEN = {"asyncio", "socket", "ssl", "selectors", "logging", "threading", "subprocess", "multiprocessing",
             "time", "random", "secrets", "os", "aiomqtt", "amqtt", "aiohttp", "httpx", "lmdb"}
ALLOWED_THIRD_PARTY = {"cbor2", "msgspec"}


def test_all_matches_public_names() -> None:
    public = {name for name, value in vars(wire).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert sorted(wire.__all__) == sorted(public)
    assert len(wire.__all__) == len(set(wire.__all__))
    for name in wire.__all__:
        assert getattr(wire, name) is not None


def test_expected_names_exported() -> None:
    expected = {
        "WIRE_MAJOR", "MAX_PAYLOAD", "MAX_TEXT", "ID_LEN", "MESSAGE_TYPES", "PREFIX", "CHANNELS",
        "TASK_FILTER", "REPLY_FILTER", "NODE_FILTER", "BATCH_FILTER", "SHARED_TASK_FILTER", "MAX_BATCH",
        "Message", "Task", "Cancel", "Accept", "Delta", "Done", "Beat", "Batch", "Err", "WireError",
        "encode", "decode", "validate",
        "TopicInfo", "task_topic", "reply_topic", "node_topic", "batch_topic", "parse_topic", "check_uid", "check_node_id",
        "is_uid", "is_node_id",
        "TaskStream", "State", "Event", "Accepted", "Text", "Duplicate", "Gap", "Finished", "Late",
    }
    assert expected <= set(wire.__all__)


def test_public_objects_come_from_private_modules() -> None:
    for name in wire.__all__:
        module = getattr(getattr(wire, name), "__module__", None)
        if module is not None and module != "typing":
            assert module.startswith("wire._"), f"{name} lives in {module}"


def test_one_exception_type() -> None:
    exceptions = [n for n in wire.__all__ if isinstance(getattr(wire, n), type)
                  and issubclass(getattr(wire, n), BaseException)]
    assert exceptions == ["WireError"]
    assert issubclass(wire.WireError, ValueError)


def test_ships_py_typed() -> None:
    assert (WIRE_DIR / "py.typed").exists()


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            roots.add("__import__")
    return roots


def test_source_imports_only_pure_modules() -> None:
    files = sorted(WIRE_DIR.glob("*.py"))
    assert files
    for path in files:
        roots = _imported_roots(path)
        assert not roots & FORBIDDEN, f"{path.name} imports {sorted(roots & FORBIDDEN)}"
        assert "__import__" not in roots and "importlib" not in roots, path.name
        third_party = {r for r in roots if r not in sys.stdlib_module_names and r != "wire"}
        assert third_party <= ALLOWED_THIRD_PARTY, f"{path.name} imports {sorted(third_party)}"


def test_importing_wire_loads_no_io_modules() -> None:
    """In a fresh interpreter, ``import wire`` (and using it) must not pull in I/O modules."""
    code = """
import json, sys
before = set(sys.modules)
import wire
msg = wire.decode(wire.encode(wire.Delta(id=bytes(16), seq=1, text="x")))
wire.TaskStream(id=bytes(16)).feed(msg)
wire.parse_topic(wire.task_topic("wc.a"))
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=WIRE_DIR.parent, check=True)
    loaded = set(json.loads(out.stdout))
    roots = {name.split(".")[0] for name in loaded}
    assert "wire" in roots
    banned = {"asyncio", "socket", "ssl", "selectors", "logging", "threading", "subprocess", "multiprocessing",
              "aiomqtt", "amqtt", "aiohttp", "httpx", "lmdb"}
    assert not roots & banned, sorted(roots & banned)
