"""Question answering over a folder of text files with LangChain and ltri-rag's KV memory (runs on a CPU).

    python examples/langchain_qa.py --model ~/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b.gguf --docs DIR

The documents are read through the model once into a ``KVMemory`` (kept in ``--memory``); the chain then answers
with in-model retrieval: the prompt holds only the question, the documents come from the stored K/V, and the
recalled spans are the citations.
"""

from __future__ import annotations

import argparse
from operator import itemgetter
from pathlib import Path
from typing import Any

import ltri_rag
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableParallel

from ltri_rag.integrations.langchain import ChatLtri, LtriRetriever

CONFIG = ltri_rag.LtriConfig(mode="ltri", local_window=512, budget=512, chunk_size=512, num_sink_tokens=64)


def answer(model: Any, tokenizer: Any, docs: Path, memory_path: Path, question: str,
           max_tokens: int = 64) -> dict[str, Any]:
    """Ingest the ``*.txt`` / ``*.md`` files of ``docs`` (new or changed ones only) and answer ``question``."""
    path = Path(memory_path)
    memory = (ltri_rag.KVMemory.open(path, model, tokenizer) if path.exists()
              else ltri_rag.KVMemory.create(path, model, tokenizer, CONFIG))
    with memory:
        retriever = LtriRetriever(memory=memory, k=3)
        files = sorted(p for p in Path(docs).iterdir() if p.suffix in (".txt", ".md"))
        stored = {d.id: d.page_content for d in retriever.get([p.name for p in files])}
        new = [Document(id=p.name, page_content=p.read_text(encoding="utf-8"), metadata={"source": str(p)})
               for p in files]
        new = [d for d in new if stored.get(d.id) != d.page_content]
        if new:
            retriever.add_documents(new)  # re-adding an id replaces that document
        chat = ChatLtri(memory=memory, max_tokens=max_tokens, temperature=0)
        prompt = ChatPromptTemplate.from_messages([("system", "Answer briefly from what you have read."),
                                                   ("human", "{question}")])
        chain = RunnableParallel(answer=prompt | chat | StrOutputParser(), sources=itemgetter("question") | retriever)
        result = chain.invoke({"question": question})
        sources = [{"doc_id": d.metadata["doc_id"], "score": round(d.metadata["score"], 3),
                    "chars": (d.metadata["start_char"], d.metadata["end_char"])} for d in result["sources"]]
        return {"answer": result["answer"], "sources": sources}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hub id, local folder or .gguf file")
    parser.add_argument("--docs", required=True, type=Path, help="folder of .txt / .md files")
    parser.add_argument("--memory", type=Path, default=Path("./langchain_qa_memory"), help="KV memory folder")
    parser.add_argument("--question", default="What are these documents about?")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer = ltri_rag.load_model(args.model, dtype="float32", device="cpu")
    result = answer(model, tokenizer, args.docs, args.memory, args.question, args.max_tokens)
    print(result["answer"])
    for source in result["sources"]:
        print("  source:", source)


if __name__ == "__main__":
    main()
