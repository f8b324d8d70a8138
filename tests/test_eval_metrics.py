"""Evaluation metrics, cascade and success criteria against hand-computed values."""

from __future__ import annotations

import math

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
    for fn in (M.exact_match, M.token_f1, M.rouge_l, M.corpus_bleu, M.generation_metrics):
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
    assert M.exact_match(["The Cat sat!"], ["cat sat"]) == 1.0
    assert M.token_f1_one("a cat sat on the mat", "the cat is on a mat") == pytest.approx(0.75)
    assert M.exact_match(["cat", "dog"], ["cat", "bird"]) == 0.5
    # several references: the best one counts
    assert M.token_f1(["cat sat on mat"], [["dog", "cat is on mat"]]) == pytest.approx(0.75)
    assert M.token_f1_one("", "") == 1.0 and M.token_f1_one("the", "cat") == 0.0


def test_rouge_l_by_hand():
    assert M.lcs_length("abcbdab", "bdcaba") == 4
    assert M.rouge_l_one("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l_one("a b c d", "a c e") == pytest.approx(4 / 7)
    assert M.rouge_l(["a b c d", "x"], ["a c e", "y"]) == pytest.approx(2 / 7)
    assert M.rouge_l_one("", "a") == 0.0


def test_bleu_by_hand():
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(1.0)
    # clipped unigram precision 2/7, no brevity penalty (7 > 6)
    degenerate = ["the the the the the the the"], ["the cat is on the mat"]
    assert M.corpus_bleu(*degenerate, max_n=1)["bleu"] == pytest.approx(2 / 7)
    assert M.corpus_bleu(*degenerate, max_n=2, smoothing="none")["bleu"] == 0.0
    # brevity penalty exp(1 - 6/2)
    short = M.corpus_bleu(["the cat"], ["the cat sat on the mat"], max_n=2, smoothing="none")
    assert short["brevity_penalty"] == pytest.approx(math.exp(-2)) and short["bleu"] == pytest.approx(math.exp(-2))
    # p = 3/4, 1/3, 0/2, 0/1 with each smoothing
    case = ["the cat sat down"], ["the cat ran down"]
    assert M.corpus_bleu(*case, smoothing="none")["bleu"] == 0.0
    assert M.corpus_bleu(*case, smoothing="exp")["bleu"] == pytest.approx((3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)
    assert M.corpus_bleu(*case, smoothing="floor")["bleu"] == pytest.approx((3 / 4 * 1 / 3 * 0.05 * 0.1) ** 0.25)
    assert M.corpus_bleu(*case, smoothing="add-k")["bleu"] == pytest.approx(0.5)
    # several references: counts clipped at the largest count in any one reference, closest reference length
    multi = M.corpus_bleu(["the the the"], [["the cat", "the the dog"]], max_n=1)
    assert multi["bleu"] == pytest.approx(2 / 3) and multi["ref_length"] == 3
    # corpus level: counts are pooled before dividing
    pooled = M.corpus_bleu(["a b", "c d"], ["a b", "c x"], max_n=1)
    assert pooled["precisions"] == [pytest.approx(3 / 4)]
    with pytest.raises(BadInputError, match="smoothing"):
        M.corpus_bleu(["a"], ["a"], smoothing="magic")


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
