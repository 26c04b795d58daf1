"""Each simulated device's own documents, for the RAG index it builds on first use.

``rag.documents`` picks the set (see :class:`edgetune.config.RagConfig`):

- ``answers``: the assistant turns of the device's own *training* conversations, one
  document per conversation, named ``answers/<i>`` (:func:`answer_source`). Held-out answers
  are never indexed; a training example never retrieves its own answer (the caller passes
  its source as the one to exclude), so training sees what evaluation sees: related
  answers, not the one to predict.
- ``pydoc``: Python's ``pydoc_data.topics`` help texts, topic ``j`` (sorted) going to device
  ``j mod num_devices``, named ``pydoc/<topic>``.
- a folder: device ``i`` indexes the text files in the ``i``-th sorted subfolder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgetune.client.chunking import document_files, read_document
from edgetune.datasets.partition import DeviceData

__all__ = ["answer_source", "device_documents", "pydoc_topics"]

_log = logging.getLogger(__name__)


def answer_source(i: int) -> str:
    """Name of the document holding training conversation ``i``'s answers."""
    return f"answers/{i:05d}"


def pydoc_topics() -> dict[str, str]:
    """Python's own help topics (``pydoc_data.topics``, shipped with CPython): name -> text."""
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def _folder_documents(root: Path, index: int, num_devices: int) -> dict[str, str]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < num_devices:
        raise ValueError(f"rag.documents {root} holds {len(folders)} subfolders for {num_devices} devices")
    found, _ = document_files([folders[index]])
    docs: dict[str, str] = {}
    for path in found:
        text, reason = read_document(path)
        if text is None:
            _log.warning("skipping %s: %s", path, reason)
        else:
            docs[str(path)] = text
    return docs


def device_documents(documents: str, data: DeviceData, index: int, num_devices: int) -> dict[str, str]:
    """The documents simulated device ``index`` indexes: source name -> text.

    Args:
        documents: ``answers``, ``pydoc`` or a folder (``rag.documents``).
        data: The device's conversations (only its training split is used).
        index: The device's partition index.
        num_devices: Devices in the federation.

    Raises:
        ValueError: ``documents`` is neither keyword nor an existing folder, or the folder
            has fewer subfolders than devices.
    """
    if documents == "answers":
        return {
            answer_source(i): "\n\n".join(m["content"] for m in conv if m["role"] == "assistant")
            for i, conv in enumerate(data.train)
        }
    if documents == "pydoc":
        topics = pydoc_topics()
        return {f"pydoc/{name}": text for j, (name, text) in enumerate(topics.items()) if j % num_devices == index}
    root = Path(documents)
    if not root.is_dir():
        raise ValueError(f"rag.documents={documents!r}: expected answers, pydoc or an existing folder")
    return _folder_documents(root, index, num_devices)
