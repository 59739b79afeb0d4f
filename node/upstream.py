"""The LLM server as the node uses it: its HTTP client, the start-up check, and the model to ask.

The check (:meth:`Upstream.probe`) asks the server for its models and warns, naming the URL and what to do,
when it cannot be reached or has no model loaded; it never stops the node (the server may come later).
"""

from __future__ import annotations

import asyncio
import logging

from core.config import NodeSettings

from .llm import LLM_HTTP, LLM_STALL, LLM_UNREACHABLE, LLMClient, LLMError, list_models

__all__ = ["PROBE_TIMEOUT_S", "Upstream"]

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # the start-up check of the LLM server waits at most this long
MODEL_TTL_S = 60.0  # with node.model empty, the server's first model is asked again after this long


class Upstream:
    """``http`` is the client to the server (set before use); ``models`` the models it listed last."""

    def __init__(self, cfg: NodeSettings, http: LLMClient | None = None) -> None:
        self.cfg = cfg
        self.http = http
        self.models: list[str] = []
        self._model: str | None = None
        self._model_at = 0.0

    async def probe(self, node_id: str) -> None:
        """At start: ask the LLM server for its models and warn, naming the URL and what to do, when it cannot
        be reached or has no model loaded. Never raises (the server may come later)."""
        url = self.cfg.llm_url
        assert self.http is not None
        try:
            models = await list_models(self.http, url, api_key=self.cfg.api_key,
                                       timeout=min(self.cfg.connect_timeout_s, PROBE_TIMEOUT_S))
        except LLMError as exc:
            if exc.code in (LLM_UNREACHABLE, LLM_STALL):
                todo = ("start LM Studio and its local server (Developer -> Start Server; port 1234 by default) or "
                        "the llama.cpp server, or correct node.llm_url")
            elif exc.code == LLM_HTTP and exc.status in (401, 403):
                todo = "set node.api_key / node.api_key_file to the server's API token"
            else:
                todo = "check that node.llm_url is the server's OpenAI-compatible base URL (ending in /v1)"
            log.warning("node %s: the LLM server at %s cannot be used (%s: %s). To fix: %s. The node runs on; "
                        "questions fail with %s until the server answers.", node_id, url, exc.code, exc, todo,
                        exc.code)
            return
        except Exception as exc:  # noqa: BLE001 - a check must never take the node down
            log.warning("node %s: checking the LLM server at %s failed: %r", node_id, url, exc)
            return
        self.models = models
        if not models:
            log.warning("node %s: the LLM server at %s has no model loaded: load one (LM Studio: the model picker "
                        "or `lms load <model>`); until then questions fail with llm_no_model.", node_id, url)
        elif self.cfg.model and self.cfg.model not in models:
            log.warning("node %s: node.model %r is not among the models the LLM server at %s lists (%s): load it, "
                        "or set node.model to one of them (\"\" = the first).", node_id, self.cfg.model, url,
                        ", ".join(models[:8]))
        else:
            log.info("node %s: LLM server at %s lists %d model(s): %s", node_id, url, len(models),
                     ", ".join(models[:8]))

    async def model(self) -> str:
        """``node.model``, or else the first model the server lists (asked at most every MODEL_TTL_S)."""
        if self.cfg.model:
            return self.cfg.model
        loop = asyncio.get_running_loop()
        if self._model is None or loop.time() - self._model_at > MODEL_TTL_S:
            assert self.http is not None
            models = await list_models(self.http, self.cfg.llm_url, api_key=self.cfg.api_key,
                                       timeout=self.cfg.connect_timeout_s)
            self.models = models
            self._model = models[0] if models else ""
            self._model_at = loop.time()
        return self._model
