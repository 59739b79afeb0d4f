"""The bench suite's processes: each part of the system in its own OS process, as deployed.

``python -m bench.procs ROLE CONFIG.json`` runs one role until its stdin closes (the orchestrator holds the
other end, so a dying orchestrator never leaves children behind) and prints one JSON line when it is ready:

* ``llm``  -- the fake LM Studio (``fakes/llm.py``) → ``{"url": ...}``
* ``edge`` -- server A: the edge with its embedded amqtt broker (or, ``broker.enabled = false``, connected to
  an external broker) → ``{"http_port": ..., "tls_port": ...}``
* ``node`` -- server B: the node, dialling the broker over TLS → ``{"ok": true}``
* ``sink`` -- a TCP server that reads and discards (the ``floor`` scenario) → ``{"port": ...}``

:class:`Proc` (orchestrator side) starts one, waits for its line and samples its RSS and CPU time from
``/proc`` and the process's CPU clock (psutil elsewhere). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# ---- orchestrator side ----------------------------------------------------------------------------------------


class Proc:
    """One child process of the bench (see the module docstring)."""

    def __init__(self, role: str, cfg: dict[str, Any], log_dir: Path, timeout: float = 30.0) -> None:
        self.role = role
        fd, path = tempfile.mkstemp(prefix=f"bench-{role}-", suffix=".json", dir=log_dir)
        with os.fdopen(fd, "w") as fh:
            json.dump(cfg, fh)
        self.log_path = log_dir / f"{role}-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen([sys.executable, "-m", "bench.procs", role, path], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.info = self._ready(timeout)
        self._cpu0 = self.cpu_s()
        self._t0 = time.monotonic()

    def _ready(self, timeout: float) -> dict[str, Any]:
        import selectors

        assert self.p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if sel.select(timeout=0.2):
                line = self.p.stdout.readline()
                if line:
                    return dict(json.loads(line))
            if self.p.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"bench: {self.role} process did not start:\n{self.tail()}")

    @property
    def pid(self) -> int:
        return self.p.pid

    def tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def cpu_mark(self) -> None:
        self._cpu0, self._t0 = self.cpu_s(), time.monotonic()

    def cpu_pct(self) -> float:
        """CPU use since the last :meth:`cpu_mark`, in % of one core."""
        dt = time.monotonic() - self._t0
        return 100.0 * (self.cpu_s() - self._cpu0) / dt if dt > 0 else 0.0

    def stop(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self.p.stdin is not None
                self.p.stdin.close()  # the child's stop signal
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._log.close()


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil  # not on /proc systems only

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used, in seconds. On Linux from the kernel's
    per-process CPU clock (ns, what ``clock_getcpuclockid(3)`` names): ``/proc/<pid>/stat`` counts in ticks
    of 10 ms, and a process using a few % of a core often shows no tick at all in a second."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            return time.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)


# ---- child side -----------------------------------------------------------------------------------------------


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.buffer.read)


def _ready(info: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()


async def _llm(cfg: dict[str, Any]) -> None:
    from fakes.llm import FakeLLMConfig, run_fake_llm

    async with run_fake_llm(FakeLLMConfig(**cfg["fake"]), port=cfg.get("port", 0)) as fake:
        _ready({"url": fake.url})
        await _until_stdin_closes()


async def _edge(cfg: dict[str, Any]) -> None:
    from core.config import load_settings
    from edge.app import INFO, run_edge

    settings = load_settings(env={}, overrides=cfg["settings"])
    async with run_edge(settings) as app:
        _ready({"http_port": app[INFO].http_port, "tls_port": app[INFO].mqtt_tls_port})
        await _until_stdin_closes()


async def _node(cfg: dict[str, Any]) -> None:
    from core.config import load_settings
    from node.worker import Node

    node = Node(load_settings(env={}, overrides=cfg["settings"]))
    task = asyncio.create_task(node.run())
    _ready({"ok": True})
    await _until_stdin_closes()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _thin(cfg: dict[str, Any]) -> None:
    """The thin relay (bench/thin.py): the ceiling the sweep's knee is compared with."""
    from .thin import serve

    runner, port = await serve(cfg["llm_url"])
    _ready({"http_port": port})
    await _until_stdin_closes()
    await runner.cleanup()


async def _sink(cfg: dict[str, Any]) -> None:
    """Reads and discards whatever its TCP clients send (the floor scenario's receiving end)."""

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            pass

    server = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0)
    _ready({"port": server.sockets[0].getsockname()[1]})
    await _until_stdin_closes()
    server.close()


ROLES = {"llm": _llm, "edge": _edge, "node": _node, "sink": _sink, "thin": _thin}


def main(argv: list[str]) -> int:
    role, path = argv
    with open(path, encoding="utf-8") as fh:
        cfg = json.load(fh)
    os.unlink(path)
    from core.runtime import configure_logging, run

    configure_logging(cfg.get("log_level", "WARNING"))
    run(lambda: ROLES[role](cfg), cfg.get("loop", "uvloop"))  # as `claw edge` / `claw node` run
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
