"""Documents in, chunks out: what the device's RAG index (``client/rag.py``) embeds.

1. ``document_files`` lists the text and markdown files under the paths a user names.
2. ``read_document`` reads one as UTF-8 text, or says why it cannot (binary, undecodable,
   unreadable), so that the caller skips it with a warning instead of crashing.
3. ``chunk_text`` cuts text into chunks of at most ``size`` characters that break at
   paragraph and markdown-heading boundaries where possible, with ``overlap`` characters of
   the chunk before repeated at the start of the next one.

Pure functions over strings and paths; no model, no index.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["TEXT_SUFFIXES", "chunk_text", "document_files", "read_document"]

TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
_HEADING = re.compile(r"^(#{1,6}\s|\S.*\n[=-]{3,}\s*$)")  # "# Title" or a setext "Title\n====="
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")
_BINARY_SNIFF = 8192


def document_files(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """The text/markdown files under ``paths`` (folders searched recursively), and the rest.

    Hidden files and folders (names starting with ``.``) are left out of folder searches.
    A file named explicitly is taken whatever its suffix.

    Returns:
        ``(documents, ignored)``: resolved paths, sorted; ``ignored`` holds the files found
        in folders whose suffix is not in :data:`TEXT_SUFFIXES`.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    documents: set[Path] = set()
    ignored: set[Path] = set()
    for path in paths:
        path = Path(path).resolve()
        if path.is_file():
            documents.add(path)
        elif path.is_dir():
            for item in path.rglob("*"):
                if not item.is_file() or any(part.startswith(".") for part in item.relative_to(path).parts):
                    continue
                (documents if item.suffix.lower() in TEXT_SUFFIXES else ignored).add(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return sorted(documents), sorted(ignored)


def read_document(path: Path) -> tuple[str | None, str]:
    """Read ``path`` as UTF-8 text.

    Returns:
        ``(text, "")`` on success, else ``(None, reason)``: a NUL byte in the first 8 KiB
        (binary), invalid UTF-8 (the byte offset is named), or an OS error.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, f"unreadable ({err.strerror or err})"
    if b"\x00" in raw[:_BINARY_SNIFF]:
        return None, "binary file (NUL bytes)"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        return None, f"not valid UTF-8 at byte {err.start} ({err.reason})"
    return text.replace("\r\n", "\n").replace("\r", "\n"), ""


def _paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines; a markdown heading starts a block and joins the next one."""
    blocks: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines: list[str] = []
        for line in block.strip("\n").split("\n"):
            if line.lstrip().startswith("#") and _HEADING.match(line.lstrip()) and lines:
                blocks.append("\n".join(lines))
                lines = []
            lines.append(line.rstrip())
        joined = "\n".join(lines).strip()
        if joined:
            blocks.append(joined)
    merged: list[str] = []
    for block in blocks:  # a heading on its own line stays with the paragraph under it
        if merged and "\n" not in merged[-1] and _HEADING.match(merged[-1]) and not _HEADING.match(block):
            merged[-1] = f"{merged[-1]}\n\n{block}"
        else:
            merged.append(block)
    return merged


def _windows(paragraph: str, size: int, overlap: int) -> list[str]:
    """Cut one over-long paragraph into pieces of at most ``size`` characters.

    Cuts fall after a sentence end where one lies in the second half of the window, else at
    the last whitespace, else mid-word; each piece after the first starts ``overlap``
    characters before the previous cut (moved forward to a word start).
    """
    pieces, start = [], 0
    while len(paragraph) - start > size:
        window = paragraph[start : start + size]
        ends = [m.start() for m in _SENTENCE_END.finditer(window) if m.start() > size // 2]
        cut = ends[-1] + 1 if ends else window.rfind(" ", size // 2) + 1 or size
        pieces.append(window[:cut].strip())
        next_start = start + max(cut - overlap, 1)
        space = paragraph.find(" ", next_start, start + cut)
        start = space + 1 if overlap and space != -1 else start + cut
    pieces.append(paragraph[start:].strip())
    return [p for p in pieces if p]


def _tail(chunk: str, overlap: int) -> str:
    """The last ``overlap`` characters of ``chunk``, starting at a word boundary."""
    if overlap <= 0 or len(chunk) <= overlap:
        return "" if overlap <= 0 else chunk
    tail = chunk[-overlap:]
    space = tail.find(" ")
    return tail[space + 1 :] if space != -1 else tail


def chunk_text(text: str, size: int = 512, overlap: int = 64) -> list[str]:
    """Cut ``text`` into chunks of at most ``size`` characters.

    Paragraphs are packed greedily into a chunk (joined by a blank line) while they fit; a
    markdown heading always starts a new chunk, so a section's chunks carry its title. A
    paragraph longer than ``size`` is cut by :func:`_windows` (whose pieces overlap). When a
    chunk is full, the next one starts with the last ``overlap`` characters of it, if that
    leaves room.

    Example:
        >>> chunk_text("# A\\n\\none. two.\\n\\n# B\\n\\nthree.", size=40, overlap=0)
        ['# A\\n\\none. two.', '# B\\n\\nthree.']

    Args:
        text: The document.
        size: Maximum characters per chunk, at least 32.
        overlap: Characters repeated between neighbouring chunks, in ``[0, size / 2)``.

    Returns:
        Non-empty chunks in document order; ``[]`` for blank text.

    Raises:
        ValueError: ``size`` or ``overlap`` out of range.
    """
    if size < 32:
        raise ValueError(f"chunk size must be at least 32 characters, got {size}")
    if not 0 <= overlap < size // 2:
        raise ValueError(f"chunk overlap must be in [0, {size // 2}) for size {size}, got {overlap}")
    chunks: list[str] = []
    current = ""
    for paragraph in _paragraphs(text):
        heading = bool(_HEADING.match(paragraph))
        pieces = _windows(paragraph, size, overlap) if len(paragraph) > size else [paragraph]
        for i, piece in enumerate(pieces):
            if current and (heading or len(current) + 2 + len(piece) > size):
                chunks.append(current)
                # Windows of one paragraph overlap already; a heading starts clean.
                tail = "" if heading or i > 0 else _tail(current, overlap)
                current = tail if len(tail) + 2 + len(piece) <= size else ""
            current = f"{current}\n\n{piece}" if current else piece
            heading = False
    if current:
        chunks.append(current)
    return chunks
