"""A student with another tokenizer: the cache keeps target tokens' character spans, the loader re-tokenises each
example with the student's tokenizer and aligns positions by character offsets, and ULD trains it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, upsc_rows
from transformers import AutoTokenizer

from kdcache.config import TrainConfig, load_config
from kdcache.errors import BadInputError, IncompatibleCacheError
from kdcache.store.reader import CacheReader
from kdcache.teacher.build import build_cache
from kdcache.tiny import build_llama, build_qwen2, build_unigram_tokenizer, save_model
from kdcache.train.crosstok import align_by_offsets, canonical_starts
from kdcache.train.loader import CacheDataset
from kdcache.train.trainer import train


@pytest.fixture(scope="module")
def unigram():
    """A SentencePiece-style unigram tokenizer: another vocabulary, and other word splits, than the teacher's BPE."""
    return build_unigram_tokenizer([f"{r['title']} {r['text']} {r['gs_paper']}" for r in upsc_rows()], 300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tokenizer, data_file):
    root = tmp_path_factory.mktemp("crosstok")
    teacher = build_qwen2(len(tokenizer), hidden_size=64, layers=2, heads=2, seed=11, tie_embeddings=False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    folder = save_model(teacher, tokenizer, root / "teacher")
    # The article text as target: long targets, split differently by the two tokenizers.
    build_cache(make_config(root / "cache", folder, data_file, 'template.target=" {text}"', "shard_size=6",
                            "sparsifier.k=32", "sparsifier.tail_temperatures=[]"))
    return str(root / "cache")


def test_spans_are_cached_and_give_back_each_target_token(cache, tokenizer):
    checked = 0
    for example in CacheReader(cache).iter_examples():
        text, starts, ends = example.record["target"], example.record["target_char_starts"], \
            example.record["target_char_ends"]
        targets = example.input_ids[example.target_mask]
        assert len(starts) == len(ends) == len(targets)
        for token, start, end in zip(targets[:-1], starts[:-1], ends[:-1]):
            assert text[start:end] == tokenizer.decode([int(token)])
        assert (starts[-1], ends[-1]) == (len(text), len(text)) and targets[-1] == tokenizer.eos_token_id
        checked += 1
    assert checked == 24


def test_alignment_by_offsets_on_hand_made_splits():
    text = " Paris is"
    teacher = canonical_starts(text, [(0, 4), (4, 6), (6, 9), (9, 9)])  # " Par" "is" " is" EOS
    student = canonical_starts(text, [(0, 1), (1, 2), (2, 6), (6, 7), (7, 9), (9, 9)])  # "▁" "P" "aris" "▁" "is" EOS
    assert teacher == [1, 4, 7, 10] and student == [1, 1, 2, 7, 7, 10]
    # the lone "▁"s predict the words after them; "aris" starts inside the teacher's " Par": unaligned
    assert align_by_offsets(teacher, student) == [(0, 0), (2, 3), (3, 5)]
    assert align_by_offsets([-1, 3], [3, -1]) == [(1, 0)]


def decoded_prefixes(tokenizer, ids) -> list[str]:
    """The text before each token, found by decoding the tokens one by one (GOLD's way), whitespace-stripped."""
    return [tokenizer.decode(ids[:n]).strip() for n in range(len(ids))]


def test_student_view_aligns_what_incremental_decoding_aligns(cache, tokenizer, unigram):
    """Independent reference: a student position is aligned to a teacher row exactly when the texts decoded before
    them (token by token, as TRL's GOLD does) agree; and the two tokenisations really split words differently."""
    plain = CacheDataset(cache, batch_size=1, shuffle=False, tokenizer=tokenizer)
    cross = CacheDataset(cache, batch_size=1, shuffle=False, student_tokenizer=unigram)
    assert cross.vocab_size == len(unigram) and cross.pad_id == unigram.pad_token_id
    texts = {e.index: e.record["target"] for e in CacheReader(cache).iter_examples()}
    split_differently = 0
    for a, b in zip(plain, cross):
        t_ids = a.input_ids[0][a.target_mask[0]].tolist()  # the teacher's target tokens (every cached row)
        s_ids = unigram(texts[int(b.example_indices[0])], add_special_tokens=False)["input_ids"]
        s_ids = s_ids + [unigram.eos_token_id]  # the student's target tokens, tokenised here
        first = int(b.attention_mask[0].sum()) - len(s_ids)
        assert b.input_ids[0][first: first + len(s_ids)].tolist() == s_ids and t_ids[-1] == tokenizer.eos_token_id
        teacher_pre = decoded_prefixes(tokenizer, t_ids[:-1]) + [tokenizer.decode(t_ids[:-1]).strip() + "<eos>"]
        student_pre = decoded_prefixes(unigram, s_ids[:-1]) + [unigram.decode(s_ids[:-1]).strip() + "<eos>"]
        expected, used = [], set()
        for j, prefix in enumerate(student_pre):  # the first student token after each text that both decode to
            if prefix in teacher_pre and prefix not in used:
                used.add(prefix)
                expected.append((teacher_pre.index(prefix), first + j))
        positions = b.target_mask[0].nonzero()[:, 0].tolist()
        assert [p for _, p in expected] == positions
        rows = [i for i, _ in expected]
        torch.testing.assert_close(b.targets.logprobs, a.targets.logprobs[rows])
        torch.testing.assert_close(b.labels, b.input_ids[0][positions])
        split_differently += len(s_ids) != len(t_ids) or len(rows) < len(t_ids)
    assert split_differently > 0


def config(cache, student, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"cache={cache}", f"student={student}", f"out={out}", "profile=cpu", "batch_size=4", "lr=3e-3",
        "lora.enabled=false", "heldout_fraction=0.25", "eval_every=1000", "save_every=1000", "chunk_size=64",
        "loss.alpha=0.0", "progress=false", "tensorboard=false", *overrides])


def test_uld_trains_a_student_with_another_tokenizer(tmp_path, cache, unigram):
    # A Llama student: under transformers 5 a Qwen2 folder loads its tokenizer as Qwen2Tokenizer, which rebuilds a
    # byte-level pre-tokenizer over the unigram vocabulary (spaces dropped); a Llama folder loads it as saved.
    student = save_model(build_llama(len(unigram), hidden_size=64, layers=1, heads=2, seed=5), unigram,
                         tmp_path / "student")
    loaded = AutoTokenizer.from_pretrained(student)
    text = upsc_rows()[0]["text"]
    assert loaded(text).input_ids == unigram(text).input_ids  # the student trains on the tokenizer it was given
    with pytest.raises(IncompatibleCacheError, match="loss.kind=uld"):
        train(config(cache, student, tmp_path / "refused", "max_steps=1"))
    with pytest.raises(BadInputError, match="loss.temperature=1"):
        train(config(cache, student, tmp_path / "hot", "max_steps=1", "loss.kind=uld", "loss.temperature=2"))
    result = train(config(cache, student, tmp_path / "run", "loss.kind=uld", "max_steps=30", "eval_every=15"))
    first, last = result.evals[0]["heldout_kd"], result.evals[-1]["heldout_kd"]
    assert result.step == 30 and (tmp_path / "run" / "final" / "tokenizer.json").exists()
    assert set(result.evals[-1]) == {"step", "heldout_kd", "heldout_targets"}
    assert last < first, result.evals


# ------------------------------------------------------------------------------ encoder-decoder (T5-family) students


def t5_student(unigram, folder=None, seed=5):
    from kdcache.tiny import build_t5

    model = build_t5(len(unigram), d_model=64, layers=1, heads=2, seed=seed, pad_id=unigram.pad_token_id,
                     eos_id=unigram.eos_token_id)
    return model if folder is None else save_model(model, unigram, folder)


def test_t5_student_reads_the_prompt_with_its_encoder_and_targets_on_its_decoder(cache, unigram):
    """Pinned to a plain ``model(input_ids=prompt, decoder_input_ids=shifted target)`` forward, example by example."""
    from kdcache.modeling import output_logits
    from kdcache.train.objective import student_hidden_states

    model = t5_student(unigram)
    batch = next(iter(CacheDataset(cache, batch_size=3, shuffle=False, student_tokenizer=unigram)))
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1  # examples of different lengths: padding exercised
    with torch.no_grad():
        got = output_logits(model, student_hidden_states(model, batch.input_ids, batch.attention_mask,
                                                         batch.target_mask, batch.prompt_lengths))
        expected = []
        for b in range(3):
            p, n = int(batch.prompt_lengths[b]), int(batch.attention_mask[b].sum())
            target = batch.input_ids[b, p:n]
            shifted = torch.cat([torch.tensor([model.config.decoder_start_token_id]), target[:-1]])
            logits = model(input_ids=batch.input_ids[b:b + 1, :p], decoder_input_ids=shifted[None]).logits[0]
            expected.append(logits[batch.target_mask[b, p:n]])
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_uld_trains_a_t5_student_from_a_decoder_only_teachers_cache(tmp_path, cache, unigram):
    from transformers import AutoModelForSeq2SeqLM

    student = t5_student(unigram, tmp_path / "t5")
    result = train(config(cache, student, tmp_path / "run", "loss.kind=uld", "max_steps=30", "eval_every=15"))
    assert result.evals[-1]["heldout_kd"] < result.evals[0]["heldout_kd"], result.evals
    trained = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "final")
    assert trained.config.is_encoder_decoder
    lora = ["lora.enabled=true", "lora.r=4", "lora.target_modules=[q, v]", "max_steps=4", "save_every=2"]
    first = train(config(cache, student, tmp_path / "lora", "loss.kind=uld", *lora), stop_after_steps=3)
    assert first.step == 3
    resumed = train(config(cache, student, tmp_path / "lora", "loss.kind=uld", *lora))  # from the step-2 checkpoint
    assert resumed.step == 4 and (tmp_path / "lora" / "final" / "adapter_config.json").exists()

    from peft import PeftModel

    from kdcache.train.export import merge_adapter

    merge_adapter(str(tmp_path / "lora" / "final"), str(tmp_path / "merged"))  # a plain seq2seq model, no peft
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(student),
                                        str(tmp_path / "lora" / "final")).eval()
    ids = torch.tensor([[5, 9, 14, 3, 1]])
    start = torch.tensor([[merged.config.decoder_start_token_id, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, decoder_input_ids=start).logits,
                                   adapted(input_ids=ids, decoder_input_ids=start).logits, rtol=1e-4, atol=1e-5)


def test_t5_eval_scores_labels_and_generates_as_a_plain_forward_does(tmp_path, unigram, data_file):
    """Eval of an encoder-decoder: label log-likelihoods pinned to ``model(prompt, decoder_input_ids)``, greedy
    texts to ``model.generate``, and a generation run with BLEU and ROUGE-L."""
    from kdcache.eval.runner import EvalConfig, run_eval
    from kdcache.eval.scoring import generate, load_model, score_labels

    folder = t5_student(unigram, tmp_path / "t5", seed=7)
    loaded = load_model(folder, device="cpu")
    model = loaded.model
    assert model.config.is_encoder_decoder
    prompts = [unigram.encode("Which GS paper is about the economy?"), unigram.encode("RBI repo rate")]
    labels = [unigram.encode("GS3", add_special_tokens=False), unigram.encode("GS1 paper", add_special_tokens=False)]
    got = score_labels(model, prompts, labels, unigram.pad_token_id, vocab_size=len(unigram))
    start = model.config.decoder_start_token_id
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for j, label in enumerate(labels):
                decoder = torch.tensor([[start] + label[:-1]])
                logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=decoder).logits[0]
                expected = float(logits.log_softmax(-1).gather(-1, torch.tensor(label)[:, None]).sum())
                assert got[i, j] == pytest.approx(expected, abs=1e-4)
    texts = generate(model, prompts, unigram, max_new_tokens=5)
    with torch.no_grad():
        alone = model.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=5, do_sample=False)
    tokens = alone[0, 1:].tolist()
    tokens = tokens[: tokens.index(unigram.eos_token_id)] if unigram.eos_token_id in tokens else tokens
    assert texts[1] == unigram.decode(tokens, skip_special_tokens=True)
    result = run_eval(EvalConfig(model=folder, data=[data_file], out=str(tmp_path / "eval"), label_field="title",
                                 prompt="{text}", mode="generate", max_new_tokens=6, limit=4, device="cpu",
                                 warmup=False, plots=False))
    assert {"bleu", "rouge_l"} <= set(result.metrics["generation"]) and result.metrics["n"] == 4


# ------------------------------------------------------------------- vocabulary mapping (TRL GOLD), real tokenisers


def decoded_texts(tokenizer, metaspace: bool) -> list[str | None]:
    """Independent reference for each token's text, by the tokenizer's own decoder: a byte-level token decoded alone
    (``None`` when it is not whole characters); a SentencePiece token decoded after a plain word, minus that word
    (its decoder drops a leading space only at the start)."""
    specials = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    word = tokenizer.convert_tokens_to_ids("a") if metaspace else None
    out = []
    for i in range(len(tokenizer)):
        if i in specials:
            out.append(None)
        elif metaspace:
            token = tokenizer.convert_ids_to_tokens(i)
            text = tokenizer.decode([word, i])[1:]
            out.append(None if token.startswith("<0x") else text)
        else:
            text = tokenizer.decode([i])
            out.append(None if "\ufffd" in text else text)
    return out


def test_vocabulary_map_maps_tokens_whose_texts_coincide_and_the_view_maps_the_cache(cache, tokenizer, unigram):
    from kdcache.train.vocabmap import UNMAPPED, vocabulary_map

    vocab = vocabulary_map(tokenizer, unigram)
    assert vocabulary_map(tokenizer, unigram) is vocab  # built once per pair, kept in memory
    teacher_texts, student_texts = decoded_texts(tokenizer, False), decoded_texts(unigram, True)
    student_ids = {}
    for j, text in enumerate(student_texts):
        if text:
            student_ids.setdefault(text, j)
    table = vocab.teacher_to_student
    for t, text in enumerate(teacher_texts):
        if t == tokenizer.eos_token_id:
            assert table[t] == unigram.eos_token_id
        elif text and text in student_ids:  # " the" (Ġthe) and "▁the" coincide
            assert table[t] == student_ids[text], (t, text)
        else:
            assert table[t] == UNMAPPED, (t, text)
    assert 20 < vocab.num_mapped < len(tokenizer) - 20  # a real overlap, and real teacher tokens with no counterpart
    assert any(" " in (teacher_texts[t] or "")[:1] for t in range(len(table)) if table[t] >= 0)

    plain = CacheDataset(cache, batch_size=2, shuffle=False, student_tokenizer=unigram)
    mapped = CacheDataset(cache, batch_size=2, shuffle=False, student_tokenizer=unigram, map_vocabulary=True)
    unmapped_seen = 0
    for a, b in zip(plain, mapped):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        for row in range(a.targets.num_rows):
            ids, lp = a.targets.ids[row].tolist(), a.targets.logprobs[row]
            expected = sorted([(table[t], float(lp[c])) for c, t in enumerate(ids) if table[t] >= 0],
                              key=lambda e: -e[1])
            got = [(int(i), float(v)) for i, v in zip(b.targets.ids[row], b.targets.logprobs[row]) if i >= 0]
            assert got == sorted(got, key=lambda e: -e[1]) and [i for i, _ in got] == [i for i, _ in expected]
            lost = [float(lp[c]) for c, t in enumerate(ids) if table[t] == UNMAPPED]
            unmapped_seen += len(lost)
            tail = torch.logsumexp(torch.tensor([float(a.targets.tail_logmass[row]), *lost], dtype=torch.float64), 0)
            assert float(b.targets.tail_logmass[row]) == pytest.approx(float(tail), abs=1e-5)
    assert unmapped_seen > 0


def test_skew_forward_kl_through_the_vocabulary_map_trains_a_t5_student(tmp_path, cache, unigram):
    student = t5_student(unigram, tmp_path / "t5")
    with pytest.raises(IncompatibleCacheError, match="loss.vocab_map=hybrid"):
        train(config(cache, student, tmp_path / "refused", "max_steps=1", "loss.kind=skew_forward_kl"))
    # vocab_map=tail differs only in the loss, pinned in tests/test_vocabmap.py
    result = train(config(cache, student, tmp_path / "run", "loss.kind=skew_forward_kl", "loss.vocab_map=hybrid",
                          "max_steps=20", "eval_every=10"))
    assert result.evals[-1]["heldout_kd"] < result.evals[0]["heldout_kd"], result.evals
