"""The device's RAG index: chunking, build, incremental add/change/delete, query, bad files, CLI.

Small document sets written by each test; the real all-MiniLM-L6-v2 embedder (loaded once per
process, about 90 MB, fast on CPU) and the tiny random Llama where a model is needed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from edgetune import wire
from edgetune.chat import IGNORE_INDEX, tokenize_conversation
from edgetune.cli import main
from edgetune.client.chunking import chunk_text, document_files, read_document
from edgetune.client.documents import answer_source, device_documents
from edgetune.client.rag import RagIndex, RagIndexError
from edgetune.client.retrieval import CONTEXT_HEADER, device_index, fit_context, rag_tokenized_device
from edgetune.config import from_flat
from edgetune.datasets.partition import DeviceData

DOCS = {
    "cats.md": "# Cats\n\nCats purr when they are content and sleep most of the day.",
    "paris.txt": "The Eiffel Tower stands in Paris, the capital of France.",
    "notes/owls.txt": "Owls hunt small rodents at night with silent flight.",
}


def _write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, body in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return root


def _top_source(index: RagIndex, query: str) -> str:
    return Path(index.search([query], 1)[0][0].chunk.source).name


# -- chunking --------------------------------------------------------------------------------


def test_chunks_break_at_headings_and_respect_the_size() -> None:
    text = "# One\n\n" + "alpha beta gamma. " * 40 + "\n\n## Two\n\nshort tail."
    chunks = chunk_text(text, size=200, overlap=40)
    assert all(len(c) <= 200 for c in chunks)
    assert chunks[0].startswith("# One") and chunks[-1] == "## Two\n\nshort tail."
    assert chunks[1][:20] in chunks[0]  # windows of a long paragraph overlap
    assert chunk_text("  \n\n ", 64, 8) == []
    assert chunk_text("# A\n\none. two.\n\n# B\n\nthree.", size=40, overlap=0) == ["# A\n\none. two.", "# B\n\nthree."]


def test_paragraphs_pack_with_an_overlapping_tail() -> None:
    paragraphs = [f"Paragraph {i} says something rather ordinary here." for i in range(6)]
    chunks = chunk_text("\n\n".join(paragraphs), size=120, overlap=30)
    assert len(chunks) > 1 and all(len(c) <= 120 for c in chunks)
    assert "".join(chunks).count("Paragraph 5") == 1
    assert chunks[1].split("\n\n")[0] in chunks[0]  # starts with the end of the one before


@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (64, 32), (64, -1)])
def test_bad_chunk_settings_are_named(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="chunk"):
        chunk_text("text", size, overlap)


def test_read_document_rejects_binary_and_undecodable_files(tmp_path: Path) -> None:
    _write(tmp_path, {"bin.txt": b"ab\x00cd", "latin.md": "caf\xe9".encode("latin-1"), "ok.md": b"\xef\xbb\xbfa\r\nb"})
    assert read_document(tmp_path / "bin.txt") == (None, "binary file (NUL bytes)")
    text, reason = read_document(tmp_path / "latin.md")
    assert text is None and "not valid UTF-8 at byte 3" in reason
    assert read_document(tmp_path / "ok.md") == ("a\nb", "")  # BOM and CRLF normalised
    assert read_document(tmp_path / "missing.md")[0] is None


def test_document_files_takes_text_and_markdown_and_skips_hidden(tmp_path: Path) -> None:
    _write(tmp_path, {"a.md": "x", "b.TXT": "x", "c.png": b"\x89PNG", ".git/d.md": "x", "e/f.rst": "x"})
    found, ignored = document_files([tmp_path])
    assert [p.name for p in found] == ["a.md", "b.TXT", "f.rst"] and [p.name for p in ignored] == ["c.png"]
    with pytest.raises(FileNotFoundError, match="no-such"):
        document_files([tmp_path / "no-such"])


# -- the index -------------------------------------------------------------------------------


def test_build_and_query(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    docs = _write(tmp_path / "docs", {**DOCS, "blob.txt": b"\x00\x01\x02", "bad.md": b"\xff\xfe\xfa"})
    index = RagIndex.open(tmp_path / "dev")
    with caplog.at_level(logging.WARNING):
        report = index.sync_files([docs])
    assert sorted(Path(p).name for p in report.added) == ["cats.md", "owls.txt", "paris.txt"]
    assert sorted(Path(p).name for p, _ in report.skipped) == ["bad.md", "blob.txt"]
    assert "skipping" in caplog.text and "blob.txt" in caplog.text  # a warning, not a crash
    assert report.embedded == len(index.chunks) == 3

    reopened = RagIndex.open(tmp_path / "dev")
    assert _top_source(reopened, "Where is the Eiffel Tower?") == "paris.txt"
    assert _top_source(reopened, "which birds fly at night") == "owls.txt"
    hits = reopened.search(["Do cats purr?"], 5)[0]
    assert len(hits) == 3 and hits[0].score > hits[1].score >= hits[2].score
    assert np.allclose(np.linalg.norm(reopened.embeddings, axis=1), 1, atol=1e-5)
    files = sorted(p.name for p in (tmp_path / "dev" / wire.RAG_DIR).iterdir())
    assert files == ["chunks-1.jsonl", "embeddings-1.npy", wire.RAG_MANIFEST_FILE]


def test_incremental_add_embeds_only_the_new_file(tmp_path: Path) -> None:
    docs = _write(tmp_path / "docs", DOCS)
    index = RagIndex.open(tmp_path / "dev")
    index.sync_files([docs])
    before = {c: row.copy() for c, row in zip(index.chunks, index.embeddings, strict=True)}

    more = _write(tmp_path / "more", {"tea.md": "Green tea is brewed at about 80 degrees Celsius."})
    report = RagIndex.open(tmp_path / "dev").sync_files([more])
    assert [Path(p).name for p in report.added] == ["tea.md"] and report.embedded == 1
    assert len(report.unchanged) == 3 and not report.changed and not report.removed

    index = RagIndex.open(tmp_path / "dev")
    assert len(index.chunks) == 4 and _top_source(index, "what temperature for green tea") == "tea.md"
    for chunk, row in zip(index.chunks, index.embeddings, strict=True):
        if chunk in before:
            assert np.array_equal(before[chunk], row)  # kept, not re-embedded
    assert RagIndex.open(tmp_path / "dev").sync_files([docs, more]).embedded == 0


def test_changed_and_deleted_files_are_updated(tmp_path: Path) -> None:
    docs = _write(tmp_path / "docs", DOCS)
    RagIndex.open(tmp_path / "dev").sync_files([docs])

    (docs / "paris.txt").write_text("Berlin is the capital of Germany; the Reichstag is there.")
    (docs / "notes" / "owls.txt").unlink()
    report = RagIndex.open(tmp_path / "dev").sync_files([])  # no paths: re-check what it holds
    assert [Path(p).name for p in report.changed] == ["paris.txt"]
    assert [Path(p).name for p in report.removed] == ["owls.txt"] and report.embedded == 1

    index = RagIndex.open(tmp_path / "dev")
    texts = [c.text for c in index.chunks]
    assert len(texts) == 2 and not any("Eiffel" in t or "Owls" in t for t in texts)
    assert _top_source(index, "capital of Germany") == "paris.txt"
    assert str(docs / "notes" / "owls.txt") not in index.sources


def test_touched_but_unchanged_files_are_not_embedded_again(tmp_path: Path) -> None:
    docs = _write(tmp_path / "docs", DOCS)
    RagIndex.open(tmp_path / "dev").sync_files([docs])
    stat = (docs / "cats.md").stat()
    os.utime(docs / "cats.md", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    report = RagIndex.open(tmp_path / "dev").sync_files([docs])
    assert report.embedded == 0 and len(report.unchanged) == 3


def test_a_file_that_turns_binary_loses_its_chunks(tmp_path: Path) -> None:
    docs = _write(tmp_path / "docs", DOCS)
    RagIndex.open(tmp_path / "dev").sync_files([docs])
    (docs / "cats.md").write_bytes(b"\x00garbage")
    report = RagIndex.open(tmp_path / "dev").sync_files([docs])
    assert [Path(p).name for p, _ in report.skipped] == ["cats.md"] and len(report.removed) == 1
    assert all("Cats" not in c.text for c in RagIndex.open(tmp_path / "dev").chunks)


def test_a_corrupt_index_is_reported_not_used(tmp_path: Path) -> None:
    RagIndex.open(tmp_path / "dev").sync_files([_write(tmp_path / "docs", DOCS)])
    (tmp_path / "dev" / wire.RAG_DIR / "embeddings-1.npy").write_bytes(b"not numpy")
    with pytest.raises(RagIndexError, match="corrupt RAG index"):
        RagIndex.open(tmp_path / "dev")


def test_named_texts_and_excluded_sources(tmp_path: Path) -> None:
    index = RagIndex.open(tmp_path / "dev", chunk_size=64, chunk_overlap=0)
    index.sync_texts({"a": "The reset button is on the back.", "b": "Hold the reset button for ten seconds."})
    assert index.search(["where is the reset button"], 2, exclude=["a"])[0][0].chunk.source == "b"
    assert [h.chunk.source for h in index.search(["reset button"], 5, exclude=["b"])[0]] == ["a"]
    report = RagIndex.open(tmp_path / "dev").sync_texts({"b": "Hold the reset button for ten seconds."})
    assert report.removed == ["a"] and report.unchanged == ["b"] and report.embedded == 0


# -- retrieval-augmented examples ------------------------------------------------------------


def test_context_never_takes_the_answers_tokens(tiny_tokenizer) -> None:
    messages = [{"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "On the shelf."}]
    plain = tokenize_conversation(tiny_tokenizer, messages, 4096)
    chunks = ["x" * 500, "y" * 500]
    augmented = fit_context(tiny_tokenizer, messages, chunks, max_length=200, max_context=1000)
    assert augmented[0]["role"] == "system" and augmented[0]["content"].startswith(CONTEXT_HEADER)
    assert "[1] xxx" in augmented[0]["content"] and "[2]" not in augmented[0]["content"]  # cut, then stop
    example = tokenize_conversation(tiny_tokenizer, augmented, 200)
    assert len(tiny_tokenizer.apply_chat_template(augmented, tokenize=True, return_dict=False)) <= 200
    supervised = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert supervised == [t for t in plain["labels"] if t != IGNORE_INDEX]  # labels stay on the answer
    capped = fit_context(tiny_tokenizer, messages, chunks, max_length=4096, max_context=60)
    assert len(capped[0]["content"]) < len(CONTEXT_HEADER) + 70


def _jsonl(path: Path, n: int) -> Path:
    lines = [
        json.dumps({"prompt": f"What is item {i}?", "response": f"Item {i} is a {c}."})
        for i, c in enumerate("abcdefgh"[:n])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulated_device_builds_its_index_once_and_never_retrieves_its_own_answer(
    tmp_path: Path, tiny_tokenizer
) -> None:
    data = _jsonl(tmp_path / "chat.jsonl", 8)
    cfg = from_flat(
        {"model.base": "tiny", "data.source": str(data), "data.max-length": 256, "rag.enabled": True,
         "rag.top-k": 1, "federation.num-devices": 1}
    )  # fmt: skip
    root = tmp_path / "devices" / "sim-0"
    device = rag_tokenized_device(cfg, "", 0, root, tiny_tokenizer)
    assert RagIndex.exists(root) and RagIndex.open(root).manifest["generation"] == 1
    assert device_index(cfg, root, "", 0).manifest["generation"] == 1  # reused, not rebuilt
    for example in device.train:
        text = tiny_tokenizer.decode(example["input_ids"])
        system, rest = text.split("<|im_start|>user", 1)
        answer = rest.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
        assert CONTEXT_HEADER in system and answer not in system  # related answers only
    with pytest.raises(RagIndexError, match="rag build"):
        device_index(cfg, tmp_path / "real", str(data), 0)  # a real device needs `rag build`


def test_answer_documents_are_the_training_split_only() -> None:
    conv = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    data = DeviceData("d", train=[conv("q1", "a1"), conv("q2", "a2")], heldout=[conv("q3", "secret")])
    docs = device_documents("answers", data, 0, 1)
    assert docs == {answer_source(0): "a1", answer_source(1): "a2"}
    pydoc = [device_documents("pydoc", data, i, 3) for i in range(3)]
    assert all(pydoc) and not set(pydoc[0]) & set(pydoc[1])


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_build_and_ask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = _write(tmp_path / "docs", DOCS)
    dev = str(tmp_path / "dev")
    assert main(["rag", "build", str(docs), "--device-dir", dev]) == 0
    assert "added 3" in capsys.readouterr().out
    assert main(["rag", "build", str(docs), "--device-dir", dev, "--chunk-size", "100"]) == 2
    assert "--rebuild" in capsys.readouterr().err
    assert main(["rag", "build", "--device-dir", dev, "--rebuild", "--chunk-size", "100"]) == 0
    assert "added 3" in capsys.readouterr().out and RagIndex.open(dev).manifest["chunk_size"] == 100
    assert main(["rag", "build", str(tmp_path / "nope"), "--device-dir", dev]) == 2

    question = "Where is the Eiffel Tower?"
    assert (
        main(["rag", "ask", question, "--device-dir", dev, "--base", "tiny", "-k", "2", "--max-new-tokens", "4"]) == 0
    )
    out = capsys.readouterr().out
    assert "retrieved 2 chunk(s)" in out and "paris.txt" in out.split("[2]")[0] and "answer (with 2" in out
    assert main(["rag", "ask", question, "--device-dir", str(tmp_path / "empty"), "--base", "tiny"]) == 2
    assert main(["rag", "ask", question, "--device-dir", dev, "--adapter", str(tmp_path)]) == 2
