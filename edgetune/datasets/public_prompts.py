"""The cloud node's public prompt set: chat examples built from Python's own documentation.

Devices train on the chatterbot-corpus; the cloud node must use data no device holds, and
nothing may be downloaded. Python ships its language reference topics as plain text in
``pydoc_data.topics`` (79 topics, about 465k characters). Each topic is cut into chunks of
whole paragraphs (at most ``max_chars`` characters each), and every chunk becomes one
conversation:

    user:      What does the Python language reference say about "assert" (part 1 of 2)?
    assistant: <the chunk's text>

The split is deterministic: chunk number ``j`` (counted over the whole set in topic order)
is held out when ``j % holdout_every == holdout_every - 1`` (every 10th by default).
"""

from __future__ import annotations

from edgetune.chat import Messages

__all__ = ["public_prompt_set", "topic_chunks"]

_MIN_PARAGRAPH = 40  # shorter pieces are headings and rules ("*****"), not content


def _paragraphs(text: str) -> list[str]:
    pieces = (p.strip() for p in text.split("\n\n"))
    return [p for p in pieces if len(p) >= _MIN_PARAGRAPH and not set(p) <= set("*=-~ \n")]


def topic_chunks(text: str, max_chars: int) -> list[str]:
    """Group a topic's paragraphs, in order, into chunks of at most ``max_chars`` characters.

    A paragraph longer than ``max_chars`` is cut at the last space before the limit.

    Example:
        >>> [len(c) for c in topic_chunks("a" * 50 + "\\n\\n" + "b" * 50, max_chars=120)]
        [102]
        >>> [len(c) for c in topic_chunks("a" * 50 + "\\n\\n" + "b" * 50, max_chars=80)]
        [50, 50]
    """
    chunks: list[str] = []
    current = ""
    for paragraph in _paragraphs(text):
        while len(paragraph) > max_chars:
            cut = paragraph.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            chunks.extend([current] if current else [])
            chunks.append(paragraph[:cut].rstrip())
            current, paragraph = "", paragraph[cut:].lstrip()
        if current and len(current) + 2 + len(paragraph) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        chunks.append(current)
    return chunks


def public_prompt_set(max_chars: int = 600, holdout_every: int = 10) -> tuple[list[Messages], list[Messages]]:
    """Train and held-out conversations from ``pydoc_data.topics`` (see the module docstring).

    Args:
        max_chars: Longest assistant answer in characters (at least 100).
        holdout_every: Every n-th chunk goes to the held-out split (at least 2).

    Returns:
        ``(train, held_out)`` lists of conversations.

    Raises:
        ValueError: ``max_chars`` or ``holdout_every`` out of range.
    """
    if max_chars < 100:
        raise ValueError(f"max_chars must be at least 100, got {max_chars}")
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be at least 2, got {holdout_every}")
    from pydoc_data.topics import topics  # stdlib; imported here so that importing this module is cheap

    train: list[Messages] = []
    held_out: list[Messages] = []
    for name in sorted(topics):
        chunks = topic_chunks(topics[name], max_chars)
        for i, chunk in enumerate(chunks, start=1):
            question = f'What does the Python language reference say about "{name}" (part {i} of {len(chunks)})?'
            conversation = [{"role": "user", "content": question}, {"role": "assistant", "content": chunk}]
            split = held_out if (len(train) + len(held_out)) % holdout_every == holdout_every - 1 else train
            split.append(conversation)
    return train, held_out
