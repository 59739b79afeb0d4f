"""The LM Studio client's errors: the ``LLM_*`` codes, :class:`LLMError` (a stable ``code``, a Simplified
Chinese ``user_message`` for the end user, an English operator detail as ``str()``), the user messages, the
"does not fit the context window" test (:func:`is_context_error`) and the mapping of an HTTP error status and
body to an :class:`LLMError` (:func:`status_error`)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["LLMError", "ERROR_CODES", "CONTEXT_PATTERNS", "USER_MESSAGES", "is_context_error", "status_error",
           "error_fields", "trunc", "LLM_UNREACHABLE", "LLM_HTTP", "LLM_NO_MODEL", "LLM_STREAM_ERROR", "LLM_STALL",
           "LLM_DROPPED", "LLM_EMPTY", "LLM_BAD_RESPONSE", "LLM_CONTEXT"]

LLM_UNREACHABLE = "llm_unreachable"
LLM_HTTP = "llm_http"
LLM_NO_MODEL = "llm_no_model"
LLM_STREAM_ERROR = "llm_stream_error"
LLM_STALL = "llm_stall"
LLM_DROPPED = "llm_dropped"
LLM_EMPTY = "llm_empty"
LLM_BAD_RESPONSE = "llm_bad_response"
LLM_CONTEXT = "llm_context"

#: Default user-facing messages (Simplified Chinese), by code.
USER_MESSAGES: dict[str, str] = {
    LLM_UNREACHABLE: "无法连接到服务器 B 上的 LM Studio，请确认 LM Studio 已启动并开启了本地服务（默认端口 1234）。",
    LLM_HTTP: "LM Studio 返回了错误，请稍后再试。",
    LLM_NO_MODEL: "服务器 B 上的 LM Studio 当前没有加载模型，请先在 LM Studio 中加载一个模型后再试。",
    LLM_STREAM_ERROR: "模型在生成回答时出错，请稍后再试。",
    LLM_STALL: "模型长时间没有响应，请稍后再试。",
    LLM_DROPPED: "与模型的连接意外中断，回答不完整，请重试。",
    LLM_EMPTY: "模型没有返回任何内容，请换个问法再试。",
    LLM_BAD_RESPONSE: "模型服务返回了无法识别的数据，请检查服务器 B 上的 LM Studio 配置。",
    LLM_CONTEXT: "问题太长，超出了模型一次能处理的长度（上下文长度），请缩短问题后再试。",
}
ERROR_CODES = frozenset(USER_MESSAGES)

USER_AUTH = "LM Studio 拒绝了请求（认证失败），请检查服务器 B 上配置的 LM Studio API 密钥。"
USER_FIRST_TOKEN = "模型响应超时（可能正在加载模型或服务器繁忙），请稍后再试。"
USER_UNFINISHED = "模型服务中途结束了本次回答（没有说明回答已完成），回答不完整，请重试。"
USER_CONTEXT_EMPTY = "模型没有返回任何内容，可能是问题太长、超出了模型的上下文长度，请缩短问题后再试。"
USER_CONTEXT_MID = "回答超出了模型的上下文长度，已被中断，回答不完整。"

#: Case-insensitive phrases that mark an error message (HTTP error body or in-stream ``error`` object) as
#: "the request does not fit the model's context window": llama.cpp's server ("request (3892 tokens) exceeds
#: the available context size (2048 tokens)", type ``exceed_context_size_error``, "Context size has been
#: exceeded."), and the OpenAI / LM Studio wordings ("maximum context length", ``context_length_exceeded``,
#: ``n_ctx``, "context window").
CONTEXT_PATTERNS = (
    "exceeds the available context size",
    "exceed_context_size",
    "context size has been exceeded",
    "context length",
    "context_length_exceeded",
    "context window",
    "n_ctx",
)


def is_context_error(text: str) -> bool:
    """Whether a server's error text says the request does not fit the model's context window."""
    low = text.lower()
    return any(p in low for p in CONTEXT_PATTERNS)

MAX_DETAIL = 300  # chars of a server-provided message kept in the operator detail
MAX_ERROR_BODY = 64 * 1024  # bytes of a non-2xx body read to extract the error message


class LLMError(Exception):
    """A failed LLM call.

    ``code``: one of the ``LLM_*`` constants; ``user_message``: Simplified Chinese text for the
    end user; ``status``: HTTP status when one was received; ``str(err)``: English detail for the
    operator (never contains the API key).
    """

    def __init__(
        self, code: str, detail: str, *, user_message: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status
        self.user_message = user_message or USER_MESSAGES.get(code, USER_MESSAGES[LLM_BAD_RESPONSE])

    def __repr__(self) -> str:
        return f"LLMError(code={self.code!r}, detail={self.detail!r}, status={self.status!r})"



def trunc(s: str, n: int = MAX_DETAIL) -> str:
    s = s.replace("\r", " ").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def error_fields(obj: Any) -> tuple[str, str]:
    """(message, code) from an OpenAI-style error object/body; tolerant of odd shapes."""
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        msg = err.get("message") or err.get("detail") or err.get("error") or ""
        code = err.get("code") or err.get("type") or ""
        return (msg if isinstance(msg, str) else json.dumps(msg, ensure_ascii=False)), str(code or "")
    if isinstance(err, str):
        return err, ""
    return (json.dumps(err, ensure_ascii=False) if err is not None else ""), ""


def status_error(status: int, body: bytes, *, what: str, no_model_on_404: bool = True) -> LLMError:
    msg, code = "", ""
    if body:
        try:
            msg, code = error_fields(json.loads(body))
        except Exception:  # not JSON, or JSON too deep (RecursionError): the raw text is the message
            msg = body[:MAX_DETAIL].decode("utf-8", "replace")
    detail = f"{what}: HTTP {status}"
    if code:
        detail += f" [{code}]"
    if msg:
        detail += f": {trunc(msg)}"
    if status not in (401, 403) and is_context_error(body[:MAX_ERROR_BODY].decode("utf-8", "replace")):
        return LLMError(LLM_CONTEXT, detail, status=status)
    if (
        (status == 404 and no_model_on_404)
        or code == "model_not_found"
        or "no models loaded" in msg.lower()
    ):
        return LLMError(LLM_NO_MODEL, detail, status=status)
    if status in (401, 403):
        return LLMError(LLM_HTTP, detail, status=status, user_message=USER_AUTH)
    return LLMError(
        LLM_HTTP, detail, status=status, user_message=f"LM Studio 返回了错误（HTTP {status}），请稍后再试。"
    )
