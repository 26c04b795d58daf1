"""``edgetune rag``: the device's own retrieval index, built and asked on the device.

edgetune rag build notes/ manual.md --device-dir dev/   index (or update) these documents
edgetune rag build --device-dir dev/                    re-check what it holds: changed and deleted files
edgetune rag build notes/ --device-dir dev/ --rebuild --chunk-size 256
edgetune rag ask "how do I reset it?" --device-dir dev/ --adapter runs/default/adapter
edgetune rag ask "how do I reset it?" --device-dir dev/ --no-rag

The index lives in ``<device-dir>/rag/`` and never leaves the device.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from edgetune.config import RagConfig

if TYPE_CHECKING:
    from edgetune.client.rag import Hit

__all__ = ["register"]

_ASK_CONTEXT_TOKENS = 768
_ASK_NEW_TOKENS = 128


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``rag build`` and ``rag ask`` to the ``edgetune`` sub-commands."""
    rag = sub.add_parser(
        "rag",
        help="the device's local document index: build it, ask it",
        description="A local vector index (all-MiniLM-L6-v2 + faiss) over the device's own text and markdown "
        "files, stored in <device-dir>/rag/; nothing in it is ever sent to the server.",
    )
    actions = rag.add_subparsers(dest="rag_command", required=True, metavar="ACTION")
    defaults = RagConfig()
    build = actions.add_parser(
        "build",
        help="index documents (incrementally)",
        description="Chunk and embed text/markdown files into the device's index. Only new or changed files are "
        "embedded; files the index holds that were deleted or changed since are updated too. Binary, undecodable "
        "and unreadable files are skipped with a warning.",
    )
    build.add_argument("docs", nargs="*", type=Path, metavar="DOCS", help="files or folders (searched recursively)")
    build.add_argument("--device-dir", required=True, type=Path, help="the device's storage folder")
    build.add_argument(
        "--chunk-size", type=int, help=f"characters per chunk (default: the index's, else {defaults.chunk_size})"
    )
    build.add_argument(
        "--chunk-overlap",
        type=int,
        help="characters repeated between neighbouring chunks (default: the index's, else "
        f"{defaults.chunk_overlap}; at most chunk-size/8 with a new --chunk-size)",
    )
    build.add_argument("--rebuild", action="store_true", help="start over (needed to change the chunk settings)")
    build.set_defaults(handler=_cmd_build)

    ask = actions.add_parser(
        "ask",
        help="retrieve context and answer a question",
        description="Retrieve the top-k chunks for QUESTION, print them with their sources and scores, and answer "
        "greedily with the base model (plus --adapter) through its chat template, the chunks as a system context.",
    )
    ask.add_argument("question", help="the question")
    ask.add_argument("--device-dir", required=True, type=Path, help="the device's storage folder")
    ask.add_argument("--adapter", type=Path, help="a PEFT adapter folder, e.g. runs/default/adapter")
    ask.add_argument("--base", default="smollm2", help="base model: smollm2 (default), tiny, or a local folder/.gguf")
    ask.add_argument("-k", "--top-k", type=int, default=5, help="chunks to retrieve (default 5)")
    ask.add_argument("--no-rag", action="store_true", help="answer without retrieved context")
    ask.add_argument(
        "--max-context-tokens", type=int, default=_ASK_CONTEXT_TOKENS, help="token cap on the context (default 768)"
    )
    ask.add_argument("--max-new-tokens", type=int, default=_ASK_NEW_TOKENS, help="answer length bound (default 128)")
    ask.set_defaults(handler=_cmd_ask)


def _chunk_settings(args: argparse.Namespace, stored: tuple[int, int] | None) -> tuple[int, int]:
    """(size, overlap) the flags ask for, defaulting to ``stored`` (or the config defaults).

    A new ``--chunk-size`` without ``--chunk-overlap`` gets at most an eighth of it as overlap.

    Raises:
        ValueError: the settings are out of range.
    """
    from edgetune.client.chunking import chunk_text

    defaults = RagConfig()
    size, overlap = stored or (defaults.chunk_size, defaults.chunk_overlap)
    if args.chunk_size is not None and args.chunk_size != size:
        size, overlap = args.chunk_size, min(overlap, args.chunk_size // 8)
    if args.chunk_overlap is not None:
        overlap = args.chunk_overlap
    chunk_text("", size, overlap)  # validates both
    return size, overlap


def _cmd_build(args: argparse.Namespace) -> int:
    from edgetune.client.rag import RagIndex, RagIndexError

    missing = [str(p) for p in args.docs if not p.exists()]
    if missing:
        print(f"edgetune: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    folder = RagIndex.folder_of(args.device_dir)
    previous = folder.with_name(f"{folder.name}.previous")
    try:
        if RagIndex.exists(args.device_dir) and not args.rebuild:
            index = RagIndex.open(args.device_dir)
            stored = (index.manifest["chunk_size"], index.manifest["chunk_overlap"])
            if _chunk_settings(args, stored) != stored:
                raise ValueError(
                    f"the index in {folder} was chunked with size/overlap {stored}, not "
                    f"{_chunk_settings(args, stored)}; add --rebuild to re-chunk and re-embed everything"
                )
        else:
            settings = _chunk_settings(args, None)
            if folder.exists():  # --rebuild: same files, new chunks; the old index stays until done
                held = [Path(k) for k, v in _held_sources(args.device_dir).items() if v.get("kind") == "file"]
                args.docs = list(args.docs) + [p for p in held if p.is_file()]
                shutil.rmtree(previous, ignore_errors=True)
                folder.rename(previous)
            index = RagIndex.open(args.device_dir, *settings)
        print(f"edgetune rag build: scanning {len(args.docs)} path(s); index {index.folder}", flush=True)
        report = index.sync_files(list(args.docs), progress=True)
    except (RagIndexError, ValueError) as err:
        if previous.exists() and not RagIndex.exists(args.device_dir):
            shutil.rmtree(folder, ignore_errors=True)
            previous.rename(folder)
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    shutil.rmtree(previous, ignore_errors=True)
    files = sum(1 for v in index.sources.values() if v.get("kind") == "file")
    print(
        f"added {len(report.added)}, changed {len(report.changed)}, removed {len(report.removed)}, "
        f"unchanged {len(report.unchanged)}, skipped {len(report.skipped)} file(s); embedded {report.embedded} "
        f"chunk(s). Index: {len(index.chunks)} chunks from {files} file(s) in {index.folder}"
    )
    return 0


def _held_sources(device_dir: Path) -> dict[str, dict]:
    """The sources an index's manifest lists (even if its chunk files are damaged)."""
    import json

    from edgetune import wire
    from edgetune.client.rag import RagIndex

    try:
        return json.loads((RagIndex.folder_of(device_dir) / wire.RAG_MANIFEST_FILE).read_text())["sources"]
    except (OSError, ValueError, KeyError):
        return {}


def _cmd_ask(args: argparse.Namespace) -> int:
    from edgetune.client.rag import RagIndex, RagIndexError

    if args.top_k < 1:
        print(f"edgetune: -k {args.top_k}: must be >= 1", file=sys.stderr)
        return 2
    if args.adapter is not None and not (args.adapter / "adapter_config.json").is_file():
        print(
            f"edgetune: --adapter {args.adapter}: not a PEFT adapter folder (no adapter_config.json)", file=sys.stderr
        )
        return 2
    context = None
    if not args.no_rag:
        if not RagIndex.exists(args.device_dir):
            print(
                f"edgetune: no index in {RagIndex.folder_of(args.device_dir)}; run `edgetune rag build`",
                file=sys.stderr,
            )
            return 2
        try:
            hits = RagIndex.open(args.device_dir).search([args.question], args.top_k)[0]
        except RagIndexError as err:
            print(f"edgetune: {err}", file=sys.stderr)
            return 2
        _print_hits(hits)
        context = [h.chunk.text for h in hits]
    print(_answer(args, context))
    return 0


def _print_hits(hits: list[Hit]) -> None:
    print(f"retrieved {len(hits)} chunk(s):")
    for rank, hit in enumerate(hits, start=1):
        snippet = textwrap.shorten(" ".join(hit.chunk.text.split()), 160, placeholder=" ...")
        print(f"  [{rank}] {hit.score:.3f}  {hit.chunk.source} (part {hit.chunk.part})\n      {snippet}")


def _answer(args: argparse.Namespace, context: list[str] | None) -> str:
    from peft import PeftModel

    from edgetune.client.retrieval import answer_question
    from edgetune.models import load_base

    print(f"loading {args.base}" + (f" + adapter {args.adapter}" if args.adapter else ""), flush=True)
    model, tokenizer = load_base(args.base)
    if args.adapter is not None:
        model = PeftModel.from_pretrained(model, args.adapter).eval()
    text = answer_question(model, tokenizer, args.question, context, args.max_context_tokens, args.max_new_tokens)
    how = "without retrieved context" if context is None else f"with {len(context)} retrieved chunk(s)"
    return f"answer ({how}):\n{text}"
