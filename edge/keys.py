"""Typed application keys for the edge's aiohttp app.

A key lives here when the type it holds does not import this module; the others sit next to their type
(``edge.api.SESSIONS``, ``edge.miniapp.MINIAPP``, ``edge.app.INFO``), so no import runs back up to here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from core.config import Settings

from .auth import Tokens
from .bridge import Bridge
from .store import Retention, TaskStore

if TYPE_CHECKING:
    from .wecom.channel import WeComChannel
    from .wecom.client import WeComApi

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", TaskStore)
RETENTION = web.AppKey("retention", Retention)  # edge.history_days (run_once: one pass now)
TOKENS = web.AppKey("tokens", Tokens)
BRIDGE = web.AppKey("bridge", Bridge)
WECOM = web.AppKey("wecom", "WeComChannel")
WECOM_API = web.AppKey("wecom_api", "WeComApi")  # the app's API client (access token cache): message/send, OAuth
# the embedded broker (when it runs in this process): its refusal counters for /metrics
BROKER = web.AppKey("broker", "ClawBroker")
