"""LMDB environments shared within one process (LMDB forbids opening one file twice per process)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import lmdb

_ENVS: dict[str, lmdb.Environment] = {}
_LOCK = threading.Lock()
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB of address space; the file grows only as data is written


def open_env(path: str | os.PathLike[str], *, max_dbs: int = 16, map_size: int = DEFAULT_MAP_SIZE,
             sync: bool = True) -> lmdb.Environment:
    """Open (or return the already open) LMDB environment in directory ``path``."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    key = str(p.resolve())
    with _LOCK:
        env = _ENVS.get(key)
        if env is None:
            env = lmdb.open(key, max_dbs=max_dbs, map_size=map_size, subdir=True, sync=sync,
                            metasync=sync, lock=True, max_readers=256)
            _ENVS[key] = env
        return env


def close_env(path: str | os.PathLike[str]) -> None:
    key = str(Path(path).resolve())
    with _LOCK:
        env = _ENVS.pop(key, None)
    if env is not None:
        env.close()
