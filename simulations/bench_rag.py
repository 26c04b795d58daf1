"""The device RAG index: retrieval quality and cost, its effect on federated training, and answers.

    python -m edgetune.simulations.bench_rag                       # all three parts, SmolLM2 (about 10 min here)
    python -m edgetune.simulations.bench_rag --skip-federated      # (a) only, plus (c) with the base model alone
    python -m edgetune.simulations.bench_rag --base tiny --devices 2 --rounds 1 --steps 2    # a quick smoke run

(a) Retrieval. Documents: Python's ``pydoc_data.topics`` (79 help topics), chunked with the
    defaults (512 / 64 characters) and embedded into one index. Held-out questions: from each
    topic, one sentence (seeded choice among its prose sentences of 60-250 characters) is
    *removed from the document before indexing* and used as the query; a query is a hit at
    k if any of its top-k chunks comes from its topic. This measures finding the right
    document from a paraphrase-free but unseen sentence; topics that overlap (e.g. two
    topics on the same statement) count as misses, so it is a lower bound. A second, easier
    set asks "What is <topic title>?" (titles are in the index). Printed: recall@1/@5 and MRR,
    median end-to-end query latency (embed + search) at the corpus's size and search-only
    latency on a 10,000-chunk index (corpus embeddings tiled with noise), and index memory
    per 10,000 chunks (faiss flat index bytes + chunk JSONL bytes).
(b) Training. The same short federated SmolLM2 run (4 devices, 2 rounds, 4 local steps; one
    seed) with ``rag.enabled`` off and on (``rag.documents=answers``: each device indexes
    its own training answers; held-out answers are never indexed; an example never
    retrieves its own answer). Held-out loss is on the assistant tokens either way; with
    RAG on the held-out prompts carry retrieved context too (see docs/rag.md).
(c) Answers. ``rag ask``'s path: a few Python questions over the pydoc index, answered
    greedily by the base model plus the RAG-trained adapter from (b), without and with
    retrieved context.

Ends with one JSON line, also written to ``--out``/result.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from edgetune.client.documents import pydoc_topics
from edgetune.client.rag import RagIndex
from edgetune.simulations.bench_cli import federation_parser, federation_settings

QUESTIONS = (
    "How do I catch an exception and still run cleanup code?",
    "What does the assert statement do when optimizations are enabled?",
    "How does a with statement use a context manager?",
)


# -- (a) retrieval ---------------------------------------------------------------------------


def _held_out_sentence(text: str, rng: np.random.Generator) -> str | None:
    """One prose sentence of 60-250 characters from the topic's body (not its title)."""
    body = text.split("\n", 2)[-1]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
    prose = [p for p in paragraphs if not re.search(r"::=|>>>|^\s*[\w.]+\(", p)]
    sentences = [s for p in prose for s in re.split(r"(?<=[.!?])\s+", p) if 60 <= len(s) <= 250]
    sentences = [s for s in sentences if len(s.split()) >= 8 and not s.startswith(("*", "-", "|"))]
    return str(rng.choice(sentences)) if sentences else None


def _remove(text: str, sentence: str) -> str:
    """``text`` without ``sentence`` (matched across its line breaks)."""
    pattern = r"\s+".join(re.escape(word) for word in sentence.split())
    return re.sub(pattern, " ", text, count=1)


def _title_question(text: str) -> str:
    title = text.splitlines()[0].strip()
    return f"What is {title[:1].lower()}{title[1:]}?"


def build_pydoc_index(device_dir: Path, seed: int) -> tuple[RagIndex, dict[str, str], dict[str, str], float, int]:
    """Index pydoc topics minus one held-out sentence each.

    An index left in ``device_dir`` by an earlier run is updated incrementally (nothing is
    embedded again when the documents are the same).

    Returns:
        The index, held-out queries and title questions (topic -> text), build seconds and
        chunks embedded by this build.
    """
    rng = np.random.default_rng(seed)
    topics = pydoc_topics()
    queries: dict[str, str] = {}
    docs: dict[str, str] = {}
    for name, text in topics.items():
        sentence = _held_out_sentence(text, rng)
        if sentence is not None:
            text = _remove(text, sentence)
            if sentence not in " ".join(text.split()):  # a sentence said twice would not be held out
                queries[name] = sentence
        docs[f"pydoc/{name}"] = text
    titles = {name: _title_question(text) for name, text in topics.items() if text.strip()}
    index = RagIndex.open(device_dir)
    start = time.perf_counter()
    report = index.sync_texts(docs, progress=True)
    return index, queries, titles, time.perf_counter() - start, report.embedded


def recall(index: RagIndex, queries: dict[str, str], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """recall@k and MRR (over the top 10) of ``queries`` (topic -> query text)."""
    hits = index.search(list(queries.values()), 10)
    ranks = []
    for topic, found in zip(queries, hits, strict=True):
        sources = [h.chunk.source for h in found]
        ranks.append(sources.index(f"pydoc/{topic}") + 1 if f"pydoc/{topic}" in sources else None)
    out = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / len(ranks) for k in ks}
    out["mrr@10"] = sum(1 / r for r in ranks if r) / len(ranks)
    return out


def latency_and_memory(index: RagIndex, queries: list[str]) -> dict[str, float]:
    """Median query latency (end to end, and search-only at 10k chunks) and bytes per 10k chunks."""
    import faiss

    index.search(queries[:1], 5)  # warm: model and faiss built
    end_to_end = []
    for q in queries:
        start = time.perf_counter()
        index.search([q], 5)
        end_to_end.append(time.perf_counter() - start)
    rng = np.random.default_rng(0)
    reps = -(-10_000 // len(index.chunks))
    big = np.tile(index.embeddings, (reps, 1))[:10_000] + rng.normal(0, 0.01, (10_000, index.embeddings.shape[1]))
    big = (big / np.linalg.norm(big, axis=1, keepdims=True)).astype(np.float32)
    flat = faiss.IndexFlatIP(big.shape[1])
    flat.add(big)
    vectors = index.embeddings[:64]
    search_only = []
    for v in vectors:
        start = time.perf_counter()
        flat.search(v[None, :], 5)
        search_only.append(time.perf_counter() - start)
    chunk_bytes = sum(len(json.dumps(c.__dict__, ensure_ascii=False)) + 1 for c in index.chunks)
    return {
        "chunks": len(index.chunks),
        "median_query_ms": 1000 * statistics.median(end_to_end),
        "median_search_ms_10k": 1000 * statistics.median(search_only),
        "faiss_mb_per_10k": len(faiss.serialize_index(flat)) / 1e6,
        "chunk_text_mb_per_10k": chunk_bytes / len(index.chunks) * 10_000 / 1e6,
    }


# -- (b) training ----------------------------------------------------------------------------


def federated(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    from edgetune.config import from_flat
    from edgetune.server.metrics import read_metrics
    from edgetune.simulations.simulate import simulate

    results = {}
    for name, rag in (("rag-off", False), ("rag-on", True)):
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = from_flat(
            {
                **federation_settings(args),
                "run-dir": str(run_dir),
                "rag.enabled": rag,
            }
        )
        print(f"== (b) {name}: {args.devices} devices, {args.rounds} rounds, {args.steps} steps", flush=True)
        start = time.perf_counter()
        simulate(cfg)
        rows = read_metrics(run_dir)
        results[name] = {
            "eval_loss": [round(m["eval_loss"], 4) for m in rows],
            "per_device_final": {d: round(v["eval_loss"], 4) for d, v in sorted(rows[-1]["per_device"].items())},
            "seconds": round(time.perf_counter() - start, 1),
        }
    return results


# -- (c) answers -----------------------------------------------------------------------------


def answers(index: RagIndex, base: str, adapter: Path | None, new_tokens: int) -> list[dict[str, object]]:
    from peft import PeftModel

    from edgetune.client.retrieval import answer_question
    from edgetune.models import load_base

    model, tokenizer = load_base(base)
    if adapter is not None and adapter.is_dir():
        model = PeftModel.from_pretrained(model, adapter).eval()
    rows = []
    for question in QUESTIONS:
        hits = index.search([question], 3)[0]
        context = [h.chunk.text for h in hits]
        rows.append(
            {
                "question": question,
                "sources": [f"{h.chunk.source}#{h.chunk.part} ({h.score:.2f})" for h in hits],
                "no_rag": answer_question(model, tokenizer, question, None, 768, new_tokens),
                "rag": answer_question(model, tokenizer, question, context, 768, new_tokens),
            }
        )
    return rows


def main() -> None:
    parser = federation_parser(__doc__, out="bench-out/rag")
    parser.add_argument("--new-tokens", type=int, default=64, help="answer length bound in (c) (default 64)")
    parser.add_argument("--skip-federated", action="store_true", help="skip (b); (c) uses the base model alone")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("== (a) retrieval over pydoc_data.topics", flush=True)
    index, queries, titles, build_s, embedded = build_pydoc_index(out / "pydoc-device", args.seed)
    held = recall(index, queries)
    title = recall(index, titles)
    cost = latency_and_memory(index, list(queries.values()))
    print(f"{'query set':<26}{'n':>4}{'recall@1':>10}{'recall@5':>10}{'MRR@10':>8}")
    for label, n, r in (("held-out sentence", len(queries), held), ("'What is <title>?'", len(titles), title)):
        print(f"{label:<26}{n:>4}{r['recall@1']:>10.3f}{r['recall@5']:>10.3f}{r['mrr@10']:>8.3f}")
    print(
        f"index: {cost['chunks']} chunks ({embedded} embedded now, {build_s:.1f} s); "
        f"median query {cost['median_query_ms']:.1f} ms (embed + search); "
        f"search alone at 10k chunks {cost['median_search_ms_10k']:.2f} ms; memory per 10k "
        f"chunks: faiss {cost['faiss_mb_per_10k']:.1f} MB + chunk text {cost['chunk_text_mb_per_10k']:.1f} MB"
    )
    result: dict[str, object] = {
        "retrieval": {"held_out_sentence": held, "title_question": title, "queries": len(queries), **cost},
        "build_seconds": round(build_s, 1),
        "chunks_embedded_by_this_build": embedded,
    }

    adapter = None
    if not args.skip_federated:
        fed = federated(args, out)
        print(f"{'run':<10}{'held-out loss by round':<40}{'per device, final'}")
        for name, r in fed.items():
            print(f"{name:<10}{' -> '.join(f'{x:.4f}' for x in r['eval_loss']):<40}{r['per_device_final']}")
        result["federated"] = {"devices": args.devices, "rounds": args.rounds, "steps": args.steps, **fed}
        adapter = out / "rag-on" / "adapter"

    print(f"== (c) answers: {args.base}" + (f" + {adapter}" if adapter else ""), flush=True)
    rows = answers(index, args.base, adapter, args.new_tokens)
    for row in rows:
        print(f"\nQ: {row['question']}\n  retrieved: {', '.join(row['sources'])}")
        print(f"  without RAG: {row['no_rag']}\n  with RAG:    {row['rag']}")
    result["answers"] = rows
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
