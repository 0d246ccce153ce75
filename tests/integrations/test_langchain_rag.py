"""The same question two ways on the real Qwen2.5-Coder-0.5B, over the same few Paul Graham essays:

* a plain LangChain text-RAG chain: ``langchain_text_splitters`` chunks, a keyword-overlap retriever, a prompt that
  pastes the top chunks, and the model (``ChatLtri`` without a memory) reading them;
* ``ChatLtri`` over a :class:`KVMemory` holding the essays (in-model KV retrieval; nothing pasted).

Both must answer the known fact; the prompt tokens of each are recorded (printed; run with ``-s``) and compared.
Also a smoke test of ``examples/langchain_qa.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_text_splitters import RecursiveCharacterTextSplitter

from ltri_rag import LtriConfig
from ltri_rag.integrations.langchain import ChatLtri
from tests.integrations.conftest import QWEN_CONFIG, essay_memory, essay_texts, needs_qwen, qwen

pytestmark = [pytest.mark.slow, needs_qwen]
QUESTION = "How many startup founders has the author worked with?"
REPO = Path(__file__).resolve().parents[2]


class KeywordRetriever(BaseRetriever):
    """Chunks ranked by how many of the query's words (4+ letters) they contain: a dependency-free stand-in for an
    embedding retriever."""

    chunks: list[Document]
    k: int = 3

    def _get_relevant_documents(self, query: str, *, run_manager, **kwargs) -> list[Document]:
        words = {w for w in re.findall(r"[a-z]+", query.lower()) if len(w) >= 4}
        scored = sorted(self.chunks, key=lambda d: -len(words & set(re.findall(r"[a-z]+", d.page_content.lower()))))
        return scored[: kwargs.get("k", self.k)]


def test_text_rag_chain_and_chatltri_over_kvmemory_both_answer(capsys) -> None:
    model, tokenizer = qwen()
    texts = essay_texts()
    splitter = RecursiveCharacterTextSplitter(chunk_size=600, chunk_overlap=60)
    chunks = splitter.create_documents(list(texts.values()), metadatas=[{"essay": n} for n in texts])
    llm = ChatLtri(hf_model=model, tokenizer=tokenizer, config=LtriConfig(**QWEN_CONFIG), max_tokens=16)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer the question from the context, in one sentence."),
        ("human", "Context:\n{context}\n\nQuestion: {question}"),
    ])
    retriever = KeywordRetriever(chunks=chunks)
    chain = ({"context": retriever | RunnableLambda(lambda docs: "\n\n".join(d.page_content for d in docs)),
              "question": RunnablePassthrough()} | prompt | llm)
    text_rag = chain.invoke(QUESTION)

    kv = ChatLtri(memory=essay_memory(), max_tokens=16, k=4).invoke(QUESTION)

    rag_in, kv_usage = text_rag.usage_metadata["input_tokens"], kv.usage_metadata
    kv_read = kv_usage["input_tokens"] - kv_usage["input_token_details"]["cache_read"]
    with capsys.disabled():
        print(f"\n[text RAG]  {len(chunks)} chunks, prompt {rag_in} tokens read: {text_rag.content!r}"
              f"\n[ChatLtri]  prompt {kv_read} tokens read + {kv_usage['input_token_details']['cache_read']} served "
              f"from the KV memory: {kv.content!r}; spans from {[s['doc_id'] for s in kv.response_metadata['spans']]}")
    assert re.search(r"\b200\b", text_rag.content), text_rag.content  # not "2008"
    assert re.search(r"\b200\b", kv.content), kv.content
    # the essay with the fact is cited first (ranked by the attention paid beyond a neutral question's)
    assert [s["doc_id"] for s in kv.response_metadata["spans"]][0] == "boss", kv.response_metadata["spans"]
    assert kv_read == kv.response_metadata["prompt_tokens"] < rag_in  # the documents are not pasted into the prompt
    assert kv_usage["input_token_details"]["cache_read"] == essay_memory().stats().tokens


def test_example_langchain_qa_runs(tmp_path) -> None:
    """``examples/langchain_qa.py``: its chain answers from a folder of documents (in process, with the loaded
    model), and the script's command line parses."""
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import langchain_qa
    finally:
        sys.path.remove(str(REPO / "examples"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "harbour.txt").write_text("The harbour master of Port Ellis is named Miriam Okafor. She keeps a red "
                                      "lighthouse log and has worked there since 1998.", encoding="utf-8")
    (docs / "bakery.txt").write_text("The bakery on Quay Street opens at six and sells rye bread and almond "
                                     "croissants to the fishermen.", encoding="utf-8")
    model, tokenizer = qwen()
    answer = langchain_qa.answer(model, tokenizer, docs, tmp_path / "mem", "Who is the harbour master of Port Ellis?",
                                 max_tokens=16)
    assert "Miriam" in answer["answer"], answer
    assert answer["sources"][0]["doc_id"] == "harbour.txt"
    run = subprocess.run([sys.executable, str(REPO / "examples" / "langchain_qa.py"), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0 and "--docs" in run.stdout, run.stderr
