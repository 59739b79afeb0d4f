"""The conversation history sent with a question: a token estimate and the trim to a budget (pure functions).

A model's context window holds the whole prompt (system prompt, previous turns, the question) plus the answer.
The node does not know a server's tokenizer, so it estimates conservatively -- it would rather send a turn too
few than one too many: every non-ASCII character counts as one token (a CJK character is about one token, often
less) and every 3 ASCII characters as one (English text averages about 4 characters per token), plus
``MESSAGE_OVERHEAD`` per message for its role and the chat template's separators.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MESSAGE_OVERHEAD", "estimate_tokens", "message_tokens", "trim_history"]

MESSAGE_OVERHEAD = 4  # tokens of one message's role and template separators


def estimate_tokens(text: str) -> int:
    """A conservative token count of ``text`` (see the module docs)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return (ascii_chars + 2) // 3 + (len(text) - ascii_chars)


def message_tokens(message: dict[str, str]) -> int:
    content = message.get("content")
    return MESSAGE_OVERHEAD + estimate_tokens(content if isinstance(content, str) else "")


def trim_history(history: Sequence[dict[str, str]], budget: int, max_turns: int) -> list[dict[str, str]]:
    """The newest turns of ``history`` (``[user, assistant, user, assistant, ...]``) whose estimated tokens fit
    in ``budget``, at most ``max_turns`` turns. Whole turns only, oldest dropped first: a turn that does not fit
    ends the history there (an older one is never kept in its place, so the conversation stays contiguous)."""
    used, start, turns = 0, len(history), 0
    while start >= 2 and turns < max_turns:
        cost = message_tokens(history[start - 2]) + message_tokens(history[start - 1])
        if used + cost > budget:
            break
        used += cost
        start -= 2
        turns += 1
    return list(history[start:])
