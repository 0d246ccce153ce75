"""Ask a folder of text files a question through LlamaIndex, answered by in-model KV retrieval (ltri-rag), with the
recalled passages as sources; --compare also runs plain text RAG (the same passages pasted into the prompt).

    python examples/llama_index_query.py --model ~/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b.gguf \\
        --docs ../shared/data/paul_graham_essays --files boss apple --question "How many founders has the author worked with?"

The documents are read through the model once into a KVMemory (--store keeps it for the next run). On a CPU, ingest
runs at tens to hundreds of tokens/s: --max-chars (default 3000) cuts each file.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import ltri_rag  # isort: skip  (first: see tests/unit/tiny_tokenizer.py)
from llama_index.core import Settings
from ltri_rag.integrations.llama_index import LtriLLM, LtriQueryEngine, text_rag_query_engine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id, model directory or .gguf file")
    parser.add_argument("--docs", required=True, type=Path, help="folder of .txt files")
    parser.add_argument("--files", nargs="*", help="file names (without .txt) in --docs; default: the first --limit")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-chars", type=int, default=3000, help="cut each file (0: whole files)")
    parser.add_argument("--question", default="What is the author's main advice?")
    parser.add_argument("--store", type=Path, help="KVMemory folder (reused when it exists); default: temporary")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--compare", action="store_true", help="also answer with plain text RAG")
    args = parser.parse_args(argv)

    paths = ([args.docs / f"{name}.txt" for name in args.files] if args.files
             else sorted(args.docs.glob("*.txt"))[:args.limit])
    if not paths:
        parser.error(f"no .txt files in {args.docs}")
    texts = [p.read_text(encoding="utf-8")[:args.max_chars or None] for p in paths]

    model, tokenizer = ltri_rag.load_model(args.model, dtype="float32", device="cpu")
    config = ltri_rag.LtriConfig(mode="ltri", local_window=512, budget=512, chunk_size=512, num_sink_tokens=64)
    llm = LtriLLM(model, tokenizer, config, num_output=args.max_new_tokens)
    Settings.llm = llm  # never the OpenAI default; no embedding model is used (no VectorStoreIndex)
    Settings.tokenizer = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]

    store = args.store or Path(tempfile.mkdtemp(prefix="ltri-li-")) / "memory"
    if store.exists():
        memory = ltri_rag.KVMemory.open(store, model, tokenizer)
    else:
        memory = ltri_rag.KVMemory.create(store, model, tokenizer, config)
    with memory:
        missing = [i for i, p in enumerate(paths) if ("default", p.stem) not in memory.list_documents("default")]
        if missing:
            memory.add_documents([texts[i] for i in missing], [{"source": str(paths[i])} for i in missing],
                                 [paths[i].stem for i in missing])
        engine = LtriQueryEngine(memory=memory, max_new_tokens=args.max_new_tokens, similarity_top_k=args.top_k)
        response = engine.query(args.question)
        print(f"Q: {args.question}\nA (KV memory): {response.response.strip()}")
        print(f"   prompt tokens {response.metadata['prompt_tokens']}, served from memory "
              f"{response.metadata['memory_tokens']}, generated {response.metadata['completion_tokens']}")
        for node in response.source_nodes:
            meta = node.node.metadata
            text = " ".join(node.node.text.split())
            print(f"   [{node.score:.3f}] {meta['doc_id']} chars {meta['start_char']}-{meta['end_char']}: {text:.90}")
        if args.compare:
            rag = text_rag_query_engine(memory, llm, similarity_top_k=args.top_k).query(args.question)
            print(f"A (text RAG): {str(rag).strip()}")


if __name__ == "__main__":
    main()
