"""Hide a passkey in ~4K tokens of real essays and answer it with each mode (the README's main job).

    python examples/passkey_demo.py --model ~/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b.gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for benchmarks.tasks in a source checkout

import ltri_rag  # noqa: E402
from benchmarks.tasks import passkey_correct, passkey_sample  # noqa: E402
from ltri_rag import LtriConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id, model directory or .gguf file")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--modes", nargs="+", default=["ltri", "streaming"])
    args = parser.parse_args()
    model, tokenizer = ltri_rag.load_model(args.model)
    sample = passkey_sample(tokenizer, args.tokens, args.depth, seed=7)
    print(f"prompt: {sample.num_tokens} tokens, pass key {sample.answer} at depth {sample.depth}")
    for mode in args.modes:
        cfg = LtriConfig(mode=mode, local_window=512, budget=512, chunk_size=512, num_sink_tokens=64)
        start = time.perf_counter()
        result = ltri_rag.generate_ids(model, tokenizer, sample.prompt, cfg, max_new_tokens=8, progress=True)
        ok = passkey_correct(result.text, sample.answer)
        print(f"{mode:<10} {'found' if ok else 'missed':<7} {result.text!r}  ({time.perf_counter() - start:.1f}s, "
              f"{result.usage})")


if __name__ == "__main__":
    main()
