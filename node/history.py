"""The conversation history sent with a question: a token estimate, the trim to a budget, and the turns kept
per conversation (no I/O).

A model's context window holds the whole prompt (system prompt, previous turns, the question) plus the answer.
The node does not know a server's tokenizer, so it estimates conservatively -- it would rather send a turn too
few than one too many: every non-ASCII character counts as one token (a CJK character is about one token, often
less) and every 3 ASCII characters as one (English text averages about 4 characters per token), plus
``MESSAGE_OVERHEAD`` per message for its role and the chat template's separators.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MAX_CONVERSATIONS", "MESSAGE_OVERHEAD", "Conversations", "estimate_tokens", "message_tokens",
           "trim_history"]

MESSAGE_OVERHEAD = 4  # tokens of one message's role and template separators
MAX_CONVERSATIONS = 10_000  # conversations kept; the one answered longest ago goes first


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


class Conversations:
    """The previous turns of every conversation, by ``(uid, conv)``, each trimmed to ``budget`` estimated tokens
    and ``max_turns`` turns (``node.history_tokens``, ``node.history_turns``)."""

    def __init__(self, budget: int, max_turns: int) -> None:
        self.budget = budget
        self.max_turns = max_turns
        self._turns: dict[tuple[str, str], list[dict[str, str]]] = {}  # least recently answered first

    def history(self, uid: str, conv: str) -> list[dict[str, str]]:
        """The conversation's previous turns to send: the newest that fit the budget and the turn limit."""
        return trim_history(self._turns.get((uid, conv), []), self.budget, self.max_turns)

    def remember(self, uid: str, conv: str, history: list[dict[str, str]], question: str, answer: str) -> None:
        """The conversation is now ``history`` (what was sent with the question: older turns that no longer fit,
        or all of them after a context-size error, are gone for good) plus this turn."""
        key = (uid, conv)
        self._turns.pop(key, None)  # re-inserted last: the oldest conversations go first
        hist = history + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        self._turns[key] = trim_history(hist, self.budget, self.max_turns)
        if len(self._turns) > MAX_CONVERSATIONS:
            self._turns.pop(next(iter(self._turns)))

    def forget(self, uid: str, conv: str) -> None:
        """Drop the conversation (its next question starts a new one)."""
        self._turns.pop((uid, conv), None)
