"""py-lmdb's ``open_db`` without a transaction waits for LMDB's write lock while holding the GIL: with a thread
of the same process inside a write transaction (the edge's and node's LMDB writers, the broker's login log),
both waited for ever. ``core.store.open_db`` opens inside an explicit write transaction, which releases the GIL.
A deadlock cannot be interrupted from inside the process, so the scenario runs in a subprocess with a timeout."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, tempfile, threading, time
sys.path.insert(0, sys.argv[1])
from core.store import open_db, open_env
env = open_env(tempfile.mkdtemp())
db = open_db(env, b"a")
started = threading.Event()

def writer():
    with env.begin(write=True, db=db) as txn:
        started.set()
        for i in range(100):
            txn.put(str(i).encode(), b"x")
            time.sleep(0.001)  # Python work between puts: needs the GIL back each time

t = threading.Thread(target=writer)
t.start()
started.wait()
open_db(env, b"a")  # existing
open_db(env, b"b")  # new
t.join()
print("ok")
"""


def test_open_db_while_another_thread_writes_does_not_deadlock() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_product_code_never_calls_open_db_without_a_transaction() -> None:
    bad = []
    for top in ("wire", "core", "broker", "edge", "node", "fakes", "claw", "bench"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "open_db" and not any(k.arg == "txn" for k in node.keywords)
                        and not (isinstance(node.func.value, ast.Name) and node.func.value.id in ("store",))):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "use core.store.open_db (an explicit write transaction): " + ", ".join(bad)
