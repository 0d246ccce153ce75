"""A character-level fast tokenizer with 256 ids (the tiny models' vocabulary), built offline in code.

Every id decodes to exactly one character or special token, so decoded text and token ids map one to one.
"""

from __future__ import annotations

# ltri_rag's engine first: with the repo root on sys.path (as under pytest), importing transformers before ltri_rag
# makes transformers import the repo's top-level ``kernels/`` folder while probing for the Hub ``kernels`` package, and
# that import cycles back into transformers (see test_layout.py). ``import ltri_rag`` alone imports nothing (its names
# load on first use), so import the memory module, which brings in the engine, ltri_rag.kernels and transformers.
import ltri_rag.memory  # noqa: F401  isort: skip
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _characters() -> list[str]:
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"] + [chr(c) for c in range(161, 256)]
    chars += [chr(c) for c in range(0x100, 0x100 + 256 - len(SPECIALS) - len(chars))]
    return chars


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ids 0-3 are ``<pad> <s> </s> <unk>``, ids 4-255 single characters.

    Strings get a leading ``<s>`` with ``add_special_tokens=True``; ``</s>`` is the eos token.
    """
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + _characters())}
    assert len(vocab) == 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", BOS_ID)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    tok.chat_template = chat_template
    assert tok.eos_token_id == EOS_ID and tok.bos_token_id == BOS_ID
    return tok
