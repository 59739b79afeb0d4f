"""The system under test, deployed for one scenario: every part in its own process on 127.0.0.1.

:func:`cluster` starts the fake LLM, the edge (with its embedded amqtt broker, or connected to a Mosquitto
started for the run) and the node in a temporary directory and waits until the edge reports the node online;
:func:`thin_cluster` starts the fake LLM and the thin relay (``bench/thin.py``) in place of edge + node. Both
yield a :class:`Cluster` (addresses and the :class:`bench.procs.Proc` handles that sample CPU and RSS) and
remove everything afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .options import Options
from .procs import Proc

__all__ = ["Cluster", "fake_cfg", "cluster", "thin_cluster", "tls_context"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    http: str
    llm_url: str
    tls_port: int
    edge: Proc
    node: Proc | None
    llm: Proc
    data: Path
    ca: Path
    broker: str
    mosquitto: subprocess.Popen[bytes] | None = None

    def procs(self) -> dict[str, Proc]:
        first = "relay" if self.broker == "thin" else "edge"  # the thin relay stands where the edge does
        return {k: v for k, v in ((first, self.edge), ("node", self.node), ("llm", self.llm)) if v is not None}

    def mark(self) -> None:
        for p in self.procs().values():
            p.cpu_mark()

    def cpu(self) -> dict[str, float]:
        return {k: round(p.cpu_pct(), 1) for k, p in self.procs().items()}


def fake_cfg(o: Options) -> dict[str, Any]:
    return {"n_tokens": o.tokens, "tokens_per_s": o.tps, "token_chars": o.token_chars, "ttft": o.ttft}


@contextlib.asynccontextmanager
async def cluster(o: Options, *, broker: str | None = None, with_node: bool = True,
                  devices: int = 0) -> AsyncIterator[Cluster]:
    """llm + edge (+ Mosquitto) + node as separate processes in a temporary directory; removed afterwards."""
    from broker.creds import CredentialStore
    from core.perms import private_dir
    from core.pki import issue_server_cert

    broker = broker or o.broker
    tmp = Path(tempfile.mkdtemp(prefix="claw-bench-"))
    procs: list[Proc] = []
    mosq: subprocess.Popen[bytes] | None = None
    try:
        a, b = tmp / "a", tmp / "b"
        private_dir(a)  # data directories are 0700 (core.perms)
        private_dir(b)
        pki = issue_server_cert(a / "pki", ["localhost", "127.0.0.1"])
        common = {"log_level": o.log_level, "loop": o.loop}
        llm = Proc("llm", {**common, "fake": fake_cfg(o)}, tmp)
        procs.append(llm)
        tls_port, http_port = _free_port(), _free_port()
        edge_over: dict[str, Any] = {
            "data_dir": str(a), "log": {"level": o.log_level},
            "edge": {"http": f"127.0.0.1:{http_port}", "dev_login": True, "max_ws_per_user": 5},
            # every simulated device connects from this one machine: no per-IP cap, room for login storms
            "broker": {"listen": f"127.0.0.1:{tls_port}", "local_listen": "127.0.0.1:0",
                       "max_connections_per_ip": 0, "auth_queue": 4096},
        }
        creds = CredentialStore(str(a))
        node_user, node_pw = creds.add("node", "bench", replace=True)
        if broker == "mosquitto":
            from broker.mosquitto import find_mosquitto, write_mosquitto_config

            exe = find_mosquitto()
            if exe is None:
                raise RuntimeError("mosquitto is not installed (Debian package mosquitto)")
            edge_pw = "edge-" + os.urandom(8).hex()
            conf = write_mosquitto_config(tmp / "mosq", port=tls_port, cafile=pki.ca_cert,
                                          certfile=a / "pki" / "server.crt", keyfile=a / "pki" / "server.key",
                                          users=[("edge", edge_pw, "edge"), (node_user, node_pw, "node")],
                                          run_as="root" if hasattr(os, "geteuid") and os.geteuid() == 0 else None)
            mosq = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL)
            await _wait_port(tls_port, 10, "mosquitto")
            edge_over["broker"] = {"enabled": False}
            edge_over["mqtt"] = {"host": "localhost", "port": tls_port, "tls": True, "ca_file": str(pki.ca_cert),
                                 "username": "edge", "password": edge_pw}
        elif broker != "amqtt":
            raise ValueError(f"unknown broker {broker!r}")
        edge = Proc("edge", {**common, "settings": edge_over}, tmp)
        procs.append(edge)
        node: Proc | None = None
        if with_node:
            node_over = {
                "data_dir": str(b), "log": {"level": o.log_level},
                "mqtt": {"host": "localhost", "port": tls_port, "tls": True, "ca_file": str(pki.ca_cert),
                         "username": node_user, "password": node_pw, "reconnect_min": 0.1, "reconnect_max": 1.0},
                "node": {"id": "bench", "llm_url": llm.info["url"], "model": "fake-model",
                         "concurrency": o.node_slots, "max_tokens": 0,  # any --tokens streams whole
                         **({"coalesce_ms": o.coalesce_ms} if o.coalesce_ms is not None else {}),
                         **({"batch_linger_ms": o.batch_linger_ms} if o.batch_linger_ms is not None else {})},
            }
            node = Proc("node", {**common, "settings": node_over}, tmp)
            procs.append(node)
        c = Cluster(f"http://127.0.0.1:{http_port}", llm.info["url"], tls_port, edge, node, llm, a, pki.ca_cert,
                    broker, mosq)
        if with_node:
            await _wait_health(c.http, "node_online", 30)
        yield c
    finally:
        for p in reversed(procs):
            p.stop()
        if mosq is not None:
            mosq.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                mosq.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.asynccontextmanager
async def thin_cluster(o: Options) -> AsyncIterator[Cluster]:
    """The fake LLM and the thin relay (bench/thin.py) in its own process, in place of edge + node."""
    tmp = Path(tempfile.mkdtemp(prefix="claw-thin-"))
    procs: list[Proc] = []
    try:
        common = {"log_level": o.log_level, "loop": o.loop}
        llm = Proc("llm", {**common, "fake": fake_cfg(o)}, tmp)
        procs.append(llm)
        relay = Proc("thin", {**common, "llm_url": llm.info["url"]}, tmp)
        procs.append(relay)
        yield Cluster(f"http://127.0.0.1:{relay.info['http_port']}", llm.info["url"], 0, relay, None, llm, tmp,
                      tmp, "thin")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _wait_port(port: int, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"bench: {what} did not listen on {port}")


async def _wait_health(http: str, key: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < end:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with s.get(f"{http}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if (await r.json()).get(key):
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"bench: the edge never reported {key}")


def tls_context(ca: Path) -> ssl.SSLContext:
    """A client TLS context that trusts the run's CA (MQTT devices dialling the broker)."""
    return ssl.create_default_context(cafile=str(ca))
