"""A chatbot that remembers what was said 50 turns ago: LangChain chat history in ltri-rag's KV memory (CPU).

    python examples/chatbot_memory.py --model ~/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b.gguf

Chat turns go into a KVChatMessageHistory (read by the model once, kept as K/V); a reply's prompt is a system line and
the new message, all said before is served from the memory by in-model retrieval. Played: a fact in turn 1, --turns
filler exchanges (essay sentences from $LTRI_DATA_DIR, canned replies; --batch per add_messages call, i.e. per
document, each costing a few model passes), then the question; --chat goes on. Replies store one exchange each.
"""

import argparse
import os
import re
import tempfile
from pathlib import Path

import ltri_rag  # isort: skip  (first: see tests/unit/tiny_tokenizer.py)
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from ltri_rag.integrations.langchain import ChatLtri, KVChatMessageHistory

CONFIG = ltri_rag.LtriConfig(mode="ltri", local_window=512, budget=512, chunk_size=512, num_sink_tokens=64)
FACT, QUESTION = "Please remember this: my locker number at the gym is 7319.", "What is my locker number at the gym?"
SYSTEM = "You are a helpful assistant. Answer the user's question from what they told you earlier."
REPLIES = ["Interesting.", "I see what you mean.", "That makes sense.", "Tell me more.", "Good point."]
DATA = Path(os.environ.get("LTRI_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def filler(folder: Path, turns: int, batch: int = 1) -> list[list[BaseMessage]]:
    """``turns`` exchanges (a sentence of ``folder``'s ``*.txt`` files, a canned reply), ``batch`` per list."""
    text = " ".join(p.read_text(encoding="utf-8") for p in sorted(Path(folder).glob("*.txt"))[:3])
    sentences = [s for s in re.split(r"(?<=[.?!])\s+", " ".join(text.split())) if 40 <= len(s) <= 160]
    if not isinstance(turns, int) or not 0 <= turns <= len(sentences) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"turns must be an int from 0 to {len(sentences)} (sentences in {folder}) and batch a "
                         f"positive int, got turns={turns!r}, batch={batch!r}")
    pairs = [[HumanMessage(s), AIMessage(REPLIES[i % len(REPLIES)])] for i, s in enumerate(sentences[:turns])]
    return [[message for pair in pairs[at:at + batch] for message in pair] for at in range(0, turns, batch)]


def reply(history: KVChatMessageHistory, text: str, max_tokens: int = 24) -> AIMessage:
    """Answer ``text`` from the conversation in the memory, then store the exchange."""
    chat = ChatLtri(memory=history.memory, collection=history.collection, max_tokens=max_tokens, temperature=0)
    answer = chat.invoke([SystemMessage(SYSTEM), HumanMessage(text)])
    history.add_messages([HumanMessage(text), answer])
    return answer


def play(memory: ltri_rag.KVMemory, folder: Path, turns: int = 50, batch: int = 10
         ) -> tuple[AIMessage, KVChatMessageHistory]:
    """The scripted conversation: the fact, ``turns`` filler exchanges, the question: (answer, the history)."""
    history = KVChatMessageHistory(memory, session_id="demo")
    history.add_messages([HumanMessage(FACT), AIMessage("Got it, I will remember that.")])
    for messages in filler(folder, turns, batch):
        history.add_messages(messages)
    return reply(history, QUESTION), history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id, model directory or .gguf file")
    parser.add_argument("--turns", type=int, default=50, help="filler exchanges between the fact and the question")
    parser.add_argument("--batch", type=int, default=10, help="filler exchanges stored per document")
    parser.add_argument("--filler", type=Path, default=DATA / "paul_graham_essays", help="folder of .txt files")
    parser.add_argument("--chat", action="store_true", help="go on chatting (empty line ends)")
    args = parser.parse_args()
    model, tokenizer = ltri_rag.load_model(args.model, dtype="float32", device="cpu")
    with tempfile.TemporaryDirectory(prefix="ltri-chat-") as folder, \
            ltri_rag.KVMemory.create(Path(folder) / "m", model, tokenizer, CONFIG) as memory:
        answer, history = play(memory, args.filler, args.turns, args.batch)
        meta = answer.response_metadata
        print(f"turn 1: {FACT}\n... {args.turns} exchanges ...\nQ: {QUESTION}\nA: {answer.content.strip()}\n   prompt "
              f"tokens {meta['prompt_tokens']}, served from memory {meta['memory_tokens']}; recalled spans:")
        for span in meta["spans"]:
            print(f"   [{span['score']:.3f}] {span['doc_id']}: {' '.join(span['text'].split()):.90}")
        while args.chat and (text := input("you: ").strip()):
            print("bot:", reply(history, text).content.strip())


if __name__ == "__main__":
    main()
