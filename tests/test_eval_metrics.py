"""Evaluation metrics, cascade and success criteria against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdcache.errors import BadInputError
from kdcache.eval import metrics as M
from kdcache.eval.cascade import cascade_curve, cascade_from_predictions, choose_threshold, curve_table
from kdcache.eval.criteria import check_criteria, metric_value, parse_criteria
from kdcache.eval.scoring import label_probabilities, parse_label

GOLD = ["A", "A", "B", "B", "C", "C"]
PRED = ["A", "B", "B", "B", "A", "A"]


def test_classification_by_hand():
    m = M.classification_metrics(GOLD, PRED, ["A", "B", "C"])
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(0.5)
    a, b, c = m["per_class"]["A"], m["per_class"]["B"], m["per_class"]["C"]
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((1 / 3, 1 / 2, 0.4))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    # C is never predicted: precision 0, not NaN
    assert (c["precision"], c["recall"], c["f1"], c["predicted"], c["support"]) == (0.0, 0.0, 0.0, 0, 2)
    assert m["macro_f1"] == pytest.approx(0.4)
    assert m["macro_precision"] == pytest.approx(1 / 3) and m["macro_recall"] == pytest.approx(0.5)
    assert m["micro_f1"] == pytest.approx(0.5) and m["outside_labels"] == 0
    assert m["confusion"] == {"gold_labels": ["A", "B", "C"], "predicted_labels": ["A", "B", "C"],
                              "matrix": [[1, 1, 0], [0, 2, 0], [2, 0, 0]]}
    assert not any(isinstance(v, float) and math.isnan(v) for row in m["per_class"].values() for v in row.values())


def test_relevance_with_a_negative_class():
    rel = M.classification_metrics(GOLD, PRED, ["A", "B", "C"], negative_label="C")["relevance"]
    counts = rel["true_positives"], rel["false_positives"], rel["false_negatives"], rel["true_negatives"]
    assert counts == (4, 2, 0, 0)
    assert rel["precision"] == pytest.approx(4 / 6) and rel["recall"] == 1.0
    assert rel["f1"] == pytest.approx(0.8) and rel["accuracy"] == pytest.approx(4 / 6)
    assert rel["n_relevant"] == 4 and rel["accuracy_on_relevant"] == pytest.approx(3 / 4)
    # nothing predicted relevant: precision 0, no NaN
    rel = M.binary_relevance(["A", "none"], ["none", "none"], "none")
    assert rel["precision"] == 0.0 and rel["recall"] == 0.0 and rel["f1"] == 0.0 and rel["accuracy"] == 0.5


def test_single_class_and_outside_predictions():
    m = M.classification_metrics(["A", "A", "A"], ["A", "A", "A"], ["A"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["micro_f1"] == 1.0
    assert m["confusion"]["matrix"] == [[3]]
    m = M.classification_metrics(["A", "B"], ["A", "unparsed"], ["A", "B"])
    assert m["accuracy"] == 0.5 and m["outside_labels"] == 1
    assert m["micro_precision"] == 1.0 and m["micro_recall"] == 0.5 and m["micro_f1"] == pytest.approx(2 / 3)
    assert m["confusion"]["predicted_labels"] == ["A", "B", "unparsed"]
    assert m["confusion"]["matrix"] == [[1, 0, 0], [0, 0, 1]]
    # a label absent from gold and predictions is not averaged in
    assert M.classification_metrics(["A", "B"], ["A", "B"], ["A", "B", "C"])["macro_f1"] == 1.0


def test_classification_and_calibration_equal_scikit_learn():
    """The hand-written classification metrics and reliability bins against scikit-learn on a random set with an
    outside prediction ('unparsed'), a never-predicted class and a label absent from both sides."""
    skm = pytest.importorskip("sklearn.metrics")
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(0)
    labels = ["GS1", "GS2", "GS3", "none", "never"]  # "never": in neither gold nor predictions
    gold = list(rng.choice(["GS1", "GS2", "GS3", "none"], size=200, p=[0.3, 0.3, 0.1, 0.3]))
    predicted = [g if rng.random() < 0.6 else str(rng.choice(["GS1", "GS2", "none", "unparsed"])) for g in gold]
    confidences = list(rng.random(200))
    confidences[:3] = [1.0, 0.0, 0.999]
    m = M.classification_metrics(gold, predicted, labels, confidences, negative_label="none", n_bins=10)

    assert m["accuracy"] == pytest.approx(skm.accuracy_score(gold, predicted), rel=1e-12)
    p_, r_, f_, support = skm.precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        row = m["per_class"][label]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (p_[i], r_[i], f_[i], support[i]), rel=1e-12), label
    present = labels[:4]  # macro averages skip the label that occurs nowhere
    for avg, keys in (("macro", present), ("micro", labels)):
        p_, r_, f_, _ = skm.precision_recall_fscore_support(gold, predicted, labels=keys, average=avg,
                                                             zero_division=0)
        assert (m[f"{avg}_precision"], m[f"{avg}_recall"], m[f"{avg}_f1"]) == pytest.approx((p_, r_, f_), rel=1e-12)
    columns = m["confusion"]["predicted_labels"]
    assert columns == labels + ["unparsed"]
    assert m["confusion"]["matrix"] == skm.confusion_matrix(gold, predicted, labels=columns)[:len(labels)].tolist()

    rel = m["relevance"]
    gold_rel, pred_rel = [g != "none" for g in gold], [p != "none" for p in predicted]
    assert rel["precision"] == pytest.approx(skm.precision_score(gold_rel, pred_rel), rel=1e-12)
    assert rel["recall"] == pytest.approx(skm.recall_score(gold_rel, pred_rel), rel=1e-12)
    assert rel["f1"] == pytest.approx(skm.f1_score(gold_rel, pred_rel), rel=1e-12)
    assert rel["accuracy"] == pytest.approx(skm.accuracy_score(gold_rel, pred_rel), rel=1e-12)

    # equal-width bins: scikit-learn lists the non-empty ones (random confidences avoid the bin edges, where
    # scikit-learn puts b/n in the lower bin and kdcache in the upper one)
    correct = [g == p for g, p in zip(gold, predicted)]
    prob_true, prob_pred = calibration_curve(correct, confidences, n_bins=10, strategy="uniform")
    bins = [b for b in m["calibration"]["bins"] if b["count"]]
    assert [b["accuracy"] for b in bins] == pytest.approx(list(prob_true), rel=1e-12)
    assert [b["mean_confidence"] for b in bins] == pytest.approx(list(prob_pred), rel=1e-12)
    counts = np.histogram(np.minimum(confidences, 1 - 1e-12), bins=10, range=(0, 1))[0]
    ece = float(np.sum(counts[counts > 0] / len(gold) * np.abs(prob_true - prob_pred)))
    assert m["calibration"]["ece"] == pytest.approx(ece, rel=1e-12)


def test_empty_and_inconsistent_input_is_a_clear_error():
    with pytest.raises(BadInputError, match="no examples"):
        M.classification_metrics([], [], ["A"])
    with pytest.raises(BadInputError, match="no examples"):
        M.accuracy([], [])
    with pytest.raises(BadInputError, match="2 gold labels but 1 predictions"):
        M.accuracy(["A", "B"], ["A"])
    with pytest.raises(BadInputError, match="not among the labels"):
        M.classification_metrics(["A", "Z"], ["A", "A"], ["A", "B"])
    with pytest.raises(BadInputError, match="negative label"):
        M.classification_metrics(["A"], ["A"], ["A", "B"], negative_label="none")
    with pytest.raises(BadInputError, match="empty"):
        M.reliability_table([], [])
    for fn in (M.exact_match, M.token_f1, M.rouge_l, M.corpus_bleu, M.corpus_chrf, M.generation_metrics):
        with pytest.raises(BadInputError, match="no examples"):
            fn([], [])


def test_ece_and_reliability_table_by_hand():
    conf = [0.95, 0.85, 0.75, 0.72, 0.3]
    correct = [True, False, True, True, False]
    table = M.reliability_table(conf, correct, n_bins=5)
    # bins [0.8, 1]: acc 0.5 conf 0.9; [0.6, 0.8): acc 1 conf 0.735; [0.2, 0.4): acc 0 conf 0.3
    assert table["ece"] == pytest.approx(2 / 5 * 0.4 + 2 / 5 * 0.265 + 1 / 5 * 0.3)
    assert [b["count"] for b in table["bins"]] == [0, 1, 0, 2, 2]
    top = table["bins"][4]
    assert top["accuracy"] == 0.5 and top["mean_confidence"] == pytest.approx(0.9) and top["gap"] == pytest.approx(0.4)
    assert table["bins"][0]["accuracy"] is None
    # confidence 1.0 lands in the last bin; a perfectly calibrated set has ECE 0
    assert M.reliability_table([1.0, 1.0], [True, True], 10)["bins"][9]["count"] == 2
    assert M.expected_calibration_error([1.0, 0.55, 0.55], [True, True, False], 10) == pytest.approx(0.05 * 2 / 3)
    summary = M.confidence_summary(conf, correct)
    assert summary["mean"] == pytest.approx(0.714)
    assert summary["mean_correct"] == pytest.approx(2.42 / 3) and summary["mean_wrong"] == pytest.approx(0.575)
    assert M.confidence_summary([0.9], [True])["mean_wrong"] is None


def test_exact_match_and_token_f1_by_hand():
    """The official SQuAD v2.0 definition: lower case, drop ASCII punctuation, drop a/an/the, split on whitespace;
    F1 over the multiset of common tokens; 1 if both sides normalise to nothing, 0 if one does; max over
    references, mean over examples."""
    assert M.exact_match(["The Cat sat!"], ["cat sat"]) == 1.0
    assert M.token_f1_one("a cat sat on the mat", "the cat is on a mat") == pytest.approx(0.75)
    assert M.exact_match(["cat", "dog"], ["cat", "bird"]) == 0.5
    # several references: the best one counts
    assert M.token_f1(["cat sat on mat"], [["dog", "cat is on mat"]]) == pytest.approx(0.75)
    assert M.token_f1_one("", "") == 1.0 and M.token_f1_one("the", "cat") == 0.0
    # punctuation is deleted, not replaced by a space ("don't" -> "dont", "U.S." -> "us"); articles only as words
    assert M.normalize_answer("Don't  stop, the U.S. theatre!") == "dont stop us theatre"
    assert M.exact_match(["An Apple"], ["apple."]) == 1.0 and M.exact_match(["theapple"], ["the apple"]) == 0.0
    # repeated tokens count as a multiset: pred "the the cat cat" -> [cat, cat]; ref "cat" -> P 1/2, R 1, F 2/3
    assert M.token_f1_one("the the cat cat", "cat") == pytest.approx(2 / 3)
    # non-ASCII punctuation is not in string.punctuation and stays; accents are kept, case folds
    assert M.normalize_answer("Café «crème»") == "café «crème»"
    assert M.token_f1_one("Café crème", "café CREME") == pytest.approx(0.5)
    # an empty prediction scores 0 against a non-empty reference, and only articles/punctuation is empty
    assert M.exact_match([""], ["Paris"]) == 0.0 and M.token_f1_one("", "Paris") == 0.0
    assert M.exact_match(["The."], [["an", "Paris"]]) == 1.0
    # mean over examples of the per-example maximum: (1 + 0.5 + 0) / 3
    f1 = M.token_f1(["red car", "big blue house", ""], [["a red car", "car"], "blue door house big", "x"])
    assert f1 == pytest.approx((1 + 2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4) + 0) / 3)


# A fixed set with the awkward cases: several references (of varying number), an empty hypothesis, a hypothesis
# shorter than 4 tokens, unicode (accents, CJK, emoji), case and punctuation differences.
HYPOTHESES = [
    "The cat sat on the mat.",
    "",
    "A quick brown fox jumps over the lazy dog",
    "Café crème coûte 3,50 €",
    "東京は日本の首都です",
    "the revenues increased",
    "Depreciation spreads the cost of an asset over its useful life 🙂",
]
REFERENCES = [
    ["The cat is sitting on the mat.", "A cat sat on a mat."],
    "Nothing was said.",
    ["The quick brown fox jumped over the lazy dog.", "A fast brown fox leaps over a lazy dog", "fox"],
    "Un café crème coûte 3,50 €.",
    ["東京は日本の首都である", "日本の首都は東京です"],
    "Revenues increased sharply",
    "Depreciation allocates the cost of a tangible asset over its useful life.",
]
# the same references as sacrebleu's reference streams: stream i holds every example's i-th reference, None if none
STREAMS = [[r[0] if isinstance(r, list) else r for r in REFERENCES],
           [r[1] if isinstance(r, list) else None for r in REFERENCES],
           [r[2] if isinstance(r, list) and len(r) > 2 else None for r in REFERENCES]]


@pytest.mark.parametrize("smoothing", M.BLEU_SMOOTHING)
def test_bleu_and_chrf_equal_sacrebleu(smoothing):
    sacrebleu = pytest.importorskip("sacrebleu")
    ours = M.corpus_bleu(HYPOTHESES, REFERENCES, smoothing=smoothing)
    theirs = sacrebleu.corpus_bleu(HYPOTHESES, STREAMS, smooth_method=smoothing)
    assert 0 < ours["bleu"] < 1 or smoothing == "none"
    assert ours["bleu"] == pytest.approx(theirs.score / 100, rel=1e-12, abs=1e-15)
    assert ours["precisions"] == pytest.approx([p / 100 for p in theirs.precisions], rel=1e-12)
    assert (ours["brevity_penalty"], ours["hyp_length"], ours["ref_length"]) == (theirs.bp, theirs.sys_len,
                                                                               theirs.ref_len)
    assert f"smooth:{smoothing}" in ours["signature"] and "tok:13a" in ours["signature"]
    chrf = M.corpus_chrf(HYPOTHESES, REFERENCES)["chrf"]
    assert 0 < chrf < 1 and chrf == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, STREAMS).score / 100, rel=1e-12)


def test_bleu_smoothing_maps_onto_sacrebleu_smooth_method():
    """On a pair with zero 3- and 4-gram matches each smoothing gives its own score, equal to sacrebleu's."""
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = ["the cat sat down", "a dog ran off"], ["the cat ran down", "the dog ran away"]
    scores = {}
    for smoothing in M.BLEU_SMOOTHING:
        scores[smoothing] = M.corpus_bleu(hyps, refs, smoothing=smoothing)["bleu"]
        expected = sacrebleu.corpus_bleu(hyps, [refs], smooth_method=smoothing).score / 100
        assert scores[smoothing] == pytest.approx(expected, rel=1e-12, abs=1e-15), smoothing
    assert scores["none"] == 0.0 and len({round(v, 9) for v in scores.values()}) == 4, scores


def test_bleu_single_sentences_equal_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    for hyp, refs in zip(HYPOTHESES, REFERENCES):
        refs = [refs] if isinstance(refs, str) else refs
        expected = sacrebleu.corpus_bleu([hyp], [[r] for r in refs]).score / 100
        assert M.corpus_bleu([hyp], [refs])["bleu"] == pytest.approx(expected, rel=1e-12, abs=1e-15), hyp
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(1.0)
    assert M.corpus_bleu([""], ["the cat"])["bleu"] == 0.0
    with pytest.raises(BadInputError, match="bleu_smoothing must be one of"):
        M.corpus_bleu(["a"], ["a"], smoothing="magic")


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_l_equals_rouge_score(use_stemmer):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    best = [max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in ([refs] if isinstance(refs, str) else refs))
            for hyp, refs in zip(HYPOTHESES, REFERENCES)]
    ours = M.rouge_l(HYPOTHESES, REFERENCES, use_stemmer=use_stemmer)
    assert 0 < ours < 1 and ours == pytest.approx(sum(best) / len(best), rel=1e-12)
    # rouge-score keeps only a-z0-9 runs: CJK text has no tokens and scores 0, whatever the reference
    assert M.rouge_l(["東京は日本の首都です"], ["東京は日本の首都です"]) == 0.0
    # the stemmer makes "increased"/"increase" and "sitting"/"sit" match
    assert M.rouge_l(["revenue increases"], ["revenues increased"], use_stemmer=True) == 1.0
    assert M.rouge_l(["revenue increases"], ["revenues increased"], use_stemmer=False) == 0.0


def test_generation_metrics_gathers_the_library_scores():
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    m = M.generation_metrics(HYPOTHESES, REFERENCES, bleu_smoothing="floor", rouge_stemmer=False)
    assert m["n"] == len(HYPOTHESES)
    assert m["bleu"] == M.corpus_bleu(HYPOTHESES, REFERENCES, smoothing="floor")["bleu"]
    assert m["chrf"] == M.corpus_chrf(HYPOTHESES, REFERENCES)["chrf"]
    assert m["rouge_l"] == M.rouge_l(HYPOTHESES, REFERENCES, use_stemmer=False)
    assert m["exact_match"] == M.exact_match(HYPOTHESES, REFERENCES)
    assert "nrefs:var" in m["bleu_details"]["signature"] and m["rouge_stemmer"] is False


def test_label_probabilities_and_parser():
    probs = label_probabilities(__import__("numpy").array([[0.0, math.log(3.0)]]))
    assert probs[0].tolist() == pytest.approx([0.25, 0.75])
    labels = ["GS1", "GS2", "relevant", "not relevant"]
    assert parse_label("Answer: gs2, maybe GS1", labels) == "GS2"
    assert parse_label("This is not relevant.", labels) == "not relevant"
    assert parse_label("It is Relevant", labels) == "relevant"
    assert parse_label("no idea", labels) == "unparsed"


def test_cascade_by_hand():
    conf = [0.9, 0.8, 0.8, 0.6, 0.4]
    student = [True, True, False, False, True]
    teacher = [True, True, True, True, False]
    curve = cascade_curve(conf, student, teacher)
    assert [(p["threshold"], p["kept"]) for p in curve] == [(None, 0), (0.9, 1), (0.8, 3), (0.6, 4), (0.4, 5)]
    assert [p["accuracy"] for p in curve] == pytest.approx([0.8, 0.8, 0.6, 0.4, 0.6])
    assert choose_threshold(curve, 0.8)["threshold"] == 0.9
    assert choose_threshold(curve, 0.6)["kept"] == 5
    assert choose_threshold(curve, 0.9) is None
    assert [p["kept"] for p in curve_table(curve)] == [5, 4, 3, 1, 0]
    records = lambda ok, c: {str(i): {"gold": "x", "predicted": "x" if o else "y", "confidence": ci}  # noqa: E731
                             for i, (o, ci) in enumerate(zip(ok, c))}
    result = cascade_from_predictions(records(teacher, [1.0] * 5), records(student, conf), target_accuracy=0.8)
    assert result["chosen"]["kept_share"] == pytest.approx(0.2)
    assert result["teacher_accuracy"] == pytest.approx(0.8) and result["student_accuracy"] == pytest.approx(0.6)
    with pytest.raises(BadInputError, match="no example ids"):
        cascade_from_predictions({"a": {}}, {"b": {}})


RUNS = {
    "A": {"accuracy": 0.80, "relevance": {"precision": 0.5}, "speed": {"latency_mean_s": 0.4},
          "per_class": {"v1.0": {"f1": 0.25}}, "confidence": {"mean_wrong": None}},
    "B": {"accuracy": 0.72, "relevance": {"precision": 0.46}, "speed": {"latency_mean_s": 0.1},
          "per_class": {"v1.0": {"f1": 0.5}}, "confidence": {"mean_wrong": None}},
}


def test_criteria_checks():
    criteria = parse_criteria({"criteria": [
        {"metric": "accuracy", "min": 0.75},
        {"metric": "relevance.precision", "min": 0.45},
        {"metric": "accuracy", "max_drop_vs": "A", "points": 10},
        {"metric": "accuracy", "max_drop_vs": "A", "amount": 0.05},
        {"metric": "accuracy", "min_ratio_vs": "A", "ratio": 0.9},
        {"metric": "speed.latency_mean_s", "max_ratio_vs": "teacher", "ratio": 0.25},
        {"metric": "per_class.v1.0.f1", "run": "A", "max": 0.3},
        {"metric": "confidence.mean_wrong", "max": 1.0},
    ]})
    runs = {**RUNS, "teacher": RUNS["A"], "student": RUNS["B"]}
    results = check_criteria(criteria, runs, {"A": "teacher", "B": "student"})
    assert [r.passed for r in results] == [False, True, True, False, True, True, True, False]
    assert results[2].bound == pytest.approx(0.70)
    assert "n/a" in results[-1].description and "counts as failed" in results[-1].description
    assert results[0].line().startswith("[FAIL] student accuracy = 0.72 >= 0.75")
    assert metric_value(RUNS["B"], "per_class.v1.0.f1") == 0.5


@pytest.mark.parametrize("entry, message", [
    ({"metric": "accuracy"}, "nothing to check"),
    ({"metric": "accuracy", "minimum": 1}, "unknown keys"),
    ({"min": 1}, "'metric'"),
    ({"metric": "accuracy", "points": 10}, "only go with 'max_drop_vs'"),
    ({"metric": "accuracy", "max_drop_vs": "A"}, "exactly one of 'points'"),
    ({"metric": "accuracy", "min_ratio_vs": "A"}, "needs 'ratio'"),
    ({"metric": "accuracy", "min": "high"}, "must be a number"),
])
def test_bad_criteria_are_refused(entry, message):
    with pytest.raises(BadInputError, match=message):
        parse_criteria([entry])


def test_unknown_metric_or_run_is_refused():
    with pytest.raises(BadInputError, match="did you mean accuracy"):
        check_criteria(parse_criteria([{"metric": "acuracy", "min": 0.5}]), RUNS)
    with pytest.raises(BadInputError, match="unknown run 'C'"):
        check_criteria(parse_criteria([{"metric": "accuracy", "run": "C", "min": 0.5}]), RUNS)
    with pytest.raises(BadInputError, match="not a number"):
        metric_value(RUNS["A"], "relevance")


def test_missing_metric_library_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else real(name, *a))
    with pytest.raises(BadInputError, match=r"need sacrebleu \(not installed\): pip install 'kdcache\[eval\]'"):
        M.generation_metrics(["a"], ["a"])
