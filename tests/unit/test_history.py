"""node.history: the conservative token estimate and the trim of a conversation's history to a budget."""

from __future__ import annotations

from fakes.llm import prompt_tokens
from node.history import MESSAGE_OVERHEAD, estimate_tokens, message_tokens, trim_history


def turn(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_estimate_counts_cjk_one_each_and_ascii_one_per_three_rounded_up() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("abc") == 1 and estimate_tokens("abcd") == 2
    assert estimate_tokens("hello 世界!") == 3 + 2  # 7 ASCII -> 3, 2 CJK
    assert estimate_tokens("ｘ😀é") == 3  # any non-ASCII character counts one
    assert message_tokens({"role": "user", "content": "你好"}) == MESSAGE_OVERHEAD + 2


def test_estimate_is_never_below_the_fake_servers_count() -> None:
    """The node's estimate errs on the high side of the fake LM server's count (one per 4 ASCII characters)."""
    for text in ("", "a", "你好", "The quick brown fox jumps over the lazy dog. " * 20, "混合 mixed text，" * 30):
        msg = {"role": "user", "content": text}
        assert message_tokens(msg) >= prompt_tokens([msg])


def test_trim_keeps_the_newest_whole_turns_within_the_budget() -> None:
    hist = turn("一" * 10, "二" * 20) + turn("三" * 10, "四" * 20) + turn("五" * 10, "六" * 20)
    per_turn = 2 * MESSAGE_OVERHEAD + 30
    assert trim_history(hist, 3 * per_turn, 10) == hist
    assert trim_history(hist, 3 * per_turn - 1, 10) == hist[2:]  # the oldest turn goes first
    assert trim_history(hist, 2 * per_turn, 10) == hist[2:]
    assert trim_history(hist, per_turn, 10) == hist[4:]
    assert trim_history(hist, per_turn - 1, 10) == []
    assert trim_history(hist, 0, 10) == []  # history_tokens = 0: no history sent
    assert trim_history([], 1000, 10) == []


def test_trim_honours_the_turn_limit_too() -> None:
    hist = turn("a", "b") * 5
    assert trim_history(hist, 10_000, 2) == hist[-4:]
    assert trim_history(hist, 10_000, 0) == []


def test_a_turn_too_big_ends_the_history_there() -> None:
    """An old short turn is never kept once a newer one was dropped: the conversation stays contiguous."""
    hist = turn("short", "ok") + turn("long question", "x" * 3000) + turn("q", "a")
    kept = trim_history(hist, 100, 10)
    assert kept == hist[4:]


def test_trim_returns_a_new_list() -> None:
    hist = turn("a", "b")
    kept = trim_history(hist, 100, 10)
    kept.append({"role": "user", "content": "c"})
    assert len(hist) == 2
