"""The default device data for simulations: the chatterbot-corpus dialogues.

chatterbot-corpus (PyPI ``chatterbot-corpus``) ships short dialogues as
``data/<language>/<topic>.yml`` files, each with a ``conversations:`` list of lists of
strings. Every (language, topic) pair is a natural non-IID slice for one virtual device.
This module owns reading those files into chat ``Messages``; splitting them across devices
lives in ``edgetune/datasets/partition.py``. Nothing is cached here: callers cache the result.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

from edgetune.chat import Messages

__all__ = ["Slices", "available_languages", "chatterbot_data_dir", "load_chatterbot"]

Slices = dict[tuple[str, str], list[Messages]]
"""Conversations keyed by ``(language, topic)``, e.g. ``("english", "ai")``."""


def chatterbot_data_dir() -> Path:
    """Locate the installed corpus's ``data`` folder without importing the package.

    Returns:
        The folder that holds one subfolder per language.

    Raises:
        ModuleNotFoundError: ``chatterbot_corpus`` is not installed.
        FileNotFoundError: The package has no ``data`` folder.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("chatterbot_corpus is not installed; install 'chatterbot-corpus==1.3.3'")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"chatterbot_corpus has no data folder at {data_dir}")
    return data_dir


def available_languages(data_dir: Path | None = None) -> tuple[str, ...]:
    """Sorted language folder names, e.g. ``("bengali", ..., "english", ...)``."""
    root = chatterbot_data_dir() if data_dir is None else Path(data_dir)
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.yml"))))


def _to_messages(conversation: Any) -> Messages | None:
    """Alternate user/assistant turns; None if fewer than one full exchange.

    Example: ``["Hi", "Hello", "How are you?"]`` becomes a user turn "Hi" and an assistant
    turn "Hello"; the unanswered "How are you?" is dropped. Items that YAML parsed as
    non-strings (numbers, booleans) are turned back into text with ``str``.
    """
    if not isinstance(conversation, list):  # a few files hold bare strings by mistake
        return None
    turns = [str(item).strip() for item in conversation]
    turns = turns[: len(turns) - len(turns) % 2]
    if len(turns) < 2:
        return None
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def _load_topic(path: Path) -> list[Messages]:
    """Conversations of one ``<topic>.yml`` file, skipping unusable entries."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise TypeError(f"{path}: expected a mapping with 'conversations', got {document!r:.60}")
    raw = document.get("conversations") or []
    if not isinstance(raw, list):
        raise TypeError(f"{path}: 'conversations' must be a list, got {type(raw).__name__}")
    converted = (_to_messages(conversation) for conversation in raw)
    return [messages for messages in converted if messages is not None]


def load_chatterbot(languages: tuple[str, ...] | None = None, *, data_dir: Path | None = None) -> Slices:
    """Load chatterbot-corpus dialogues as chat conversations, one slice per language/topic.

    Each dialogue becomes alternating messages, the first from the user. Dialogues with
    fewer than two turns, or that are not lists, are skipped; an unanswered final user turn
    is dropped; content is stripped of surrounding whitespace. Topics left with no
    conversation are omitted.

    Args:
        languages: Language folder names such as ``("english",)``; None loads them all.
        data_dir: Corpus ``data`` folder; defaults to the installed package's.

    Returns:
        ``{(language, topic): conversations}`` in sorted key order, e.g. ``("english", "ai")``.

    Raises:
        TypeError: ``languages`` is a single string rather than a tuple of them, or a topic
            file is not a mapping with a ``conversations`` list.
        ValueError: ``languages`` is empty, or a requested language is not in the corpus
            (the message lists those available).
        ModuleNotFoundError: ``chatterbot_corpus`` is not installed.
    """
    if isinstance(languages, str):
        raise TypeError(f"languages must be a tuple of names, got the string {languages!r}")
    root = chatterbot_data_dir() if data_dir is None else Path(data_dir)
    available = available_languages(root)
    if languages is not None and not languages:
        raise ValueError("languages is empty; pass None to load every language")
    wanted = available if languages is None else tuple(dict.fromkeys(languages))
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"unknown chatterbot languages {unknown}; available: {', '.join(available)}")
    slices: Slices = {}
    for language in sorted(wanted):
        for path in sorted((root / language).glob("*.yml")):
            conversations = _load_topic(path)
            if conversations:
                slices[(language, path.stem)] = conversations
    return slices
