"""Evaluation metrics, each defined in docs/evaluation.md.

Classification, written out in plain Python/numpy (pinned to hand-computed values and to scikit-learn in tests):
accuracy, per-class precision/recall/F1, macro and micro averages, confusion matrix, binary relevance metrics
(everything but a negative class counts as "relevant"), expected calibration error with a reliability table, and
average confidence on right and wrong answers.
Generation: exact match and token F1 (the official SQuAD definition), ROUGE-L (rouge-score), corpus BLEU and chrF
(sacrebleu), all on a 0..1 scale.

Every function refuses empty input with a BadInputError: a metric over nothing is not zero, it is undefined.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from kdcache.errors import BadInputError


def _div(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0.0 when the denominator is 0 (a never-predicted class has precision 0)."""
    return float(numerator) / float(denominator) if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _div(2 * precision * recall, precision + recall)


def _check_pair(gold: Sequence, predicted: Sequence, what: str) -> None:
    if len(gold) == 0:
        raise BadInputError(f"cannot compute {what} over no examples: the gold and predicted lists are empty")
    if len(gold) != len(predicted):
        raise BadInputError(f"cannot compute {what}: {len(gold)} gold labels but {len(predicted)} predictions")


# ---------------------------------------------------------------------------------------------- classification


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """Share of examples whose predicted label equals the gold label."""
    _check_pair(gold, predicted, "accuracy")
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """Counts of (gold row, predicted column). Columns are `labels` plus any other predicted value (e.g. 'unparsed')."""
    _check_pair(gold, predicted, "a confusion matrix")
    extra = sorted({p for p in predicted if p not in labels})
    columns = list(labels) + extra
    row_index = {label: i for i, label in enumerate(labels)}
    col_index = {label: i for i, label in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in labels]
    for g, p in zip(gold, predicted):
        if g not in row_index:
            raise BadInputError(f"gold label {g!r} is not one of the labels {list(labels)}")
        matrix[row_index[g]][col_index[p]] += 1
    return {"gold_labels": list(labels), "predicted_labels": columns, "matrix": matrix}


def per_class_metrics(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """Precision, recall, F1, support (gold count) and predicted count for each label; 0/0 is taken as 0."""
    _check_pair(gold, predicted, "per-class metrics")
    result = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        support = sum(g == label for g in gold)
        n_predicted = sum(p == label for p in predicted)
        precision = _div(tp, n_predicted)
        recall = _div(tp, support)
        result[label] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
                         "support": support, "predicted": n_predicted, "true_positives": tp}
    return result


def binary_relevance(gold: Sequence[str], predicted: Sequence[str], negative_label: str) -> dict:
    """Relevant-vs-not metrics, where relevant means "any label but `negative_label`" (positive class: relevant).

    `accuracy_on_relevant` is the share of gold-relevant examples whose full label is right (e.g. the GS paper).
    """
    _check_pair(gold, predicted, "relevance metrics")
    tp = fp = fn = tn = 0
    for g, p in zip(gold, predicted):
        gold_relevant, predicted_relevant = g != negative_label, p != negative_label
        if gold_relevant and predicted_relevant:
            tp += 1
        elif predicted_relevant:
            fp += 1
        elif gold_relevant:
            fn += 1
        else:
            tn += 1
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    relevant = [(g, p) for g, p in zip(gold, predicted) if g != negative_label]
    return {
        "negative_label": negative_label,
        "accuracy": (tp + tn) / len(gold),
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "true_positives": tp, "false_positives": fp, "false_negatives": fn, "true_negatives": tn,
        "n_relevant": len(relevant),
        "accuracy_on_relevant": _div(sum(g == p for g, p in relevant), len(relevant)),
    }


def reliability_table(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> dict:
    """Expected calibration error over `n_bins` equal-width confidence bins, and the bins themselves.

    Bin b holds confidences in [b/n, (b+1)/n) (the last bin also holds 1.0). ECE = sum_b (n_b / N) |acc_b - conf_b|.
    Empty bins are listed with count 0 and null accuracy/confidence, and contribute nothing.
    """
    if n_bins < 1:
        raise BadInputError(f"the number of calibration bins must be at least 1, got {n_bins}")
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        raise BadInputError("cannot compute calibration over no examples: the confidence list is empty")
    if conf.shape != hits.shape:
        raise BadInputError(f"cannot compute calibration: {conf.size} confidences but {hits.size} correctness flags")
    if np.isnan(conf).any() or (conf < 0).any() or (conf > 1).any():
        raise BadInputError("confidences must be probabilities in [0, 1]")
    index = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        member = index == b
        count = int(member.sum())
        row = {"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count,
               "accuracy": None, "mean_confidence": None, "gap": None}
        if count:
            acc, mean_conf = float(hits[member].mean()), float(conf[member].mean())
            row.update(accuracy=acc, mean_confidence=mean_conf, gap=mean_conf - acc)
            ece += count / conf.size * abs(acc - mean_conf)
        bins.append(row)
    return {"ece": ece, "n_bins": n_bins, "bins": bins}


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """ECE with equal-width bins (see `reliability_table`)."""
    return reliability_table(confidences, correct, n_bins)["ece"]


def confidence_summary(confidences: Sequence[float], correct: Sequence[bool]) -> dict:
    """Mean confidence overall, on right answers and on wrong answers (null when there are none of a kind)."""
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        raise BadInputError("cannot summarise confidence over no examples: the confidence list is empty")
    return {
        "mean": float(conf.mean()),
        "mean_correct": float(conf[hits].mean()) if hits.any() else None,
        "mean_wrong": float(conf[~hits].mean()) if (~hits).any() else None,
        "n_correct": int(hits.sum()),
        "n_wrong": int((~hits).sum()),
    }


def classification_metrics(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str] | None = None,
                           confidences: Sequence[float] | None = None, negative_label: str | None = None,
                           n_bins: int = 10) -> dict:
    """Every classification metric at once, as a JSON-ready dict (the body of metrics.json).

    `labels` are the classes (default: the sorted gold labels); a gold label outside them is an error, a predicted
    value outside them (e.g. 'unparsed' from generation) counts as wrong and gets its own confusion column.
    Macro averages are over the labels that occur in the gold or the predictions (a label absent from both is not
    evaluated); micro averages pool all decisions: micro precision = TP / predictions inside the label set,
    micro recall = TP / examples, so micro F1 equals accuracy when every prediction is a label.
    """
    _check_pair(gold, predicted, "classification metrics")
    gold, predicted = [str(g) for g in gold], [str(p) for p in predicted]
    labels = list(labels) if labels is not None else sorted(set(gold))
    if not labels:
        raise BadInputError("cannot compute classification metrics without any label")
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise BadInputError(f"gold labels {unknown} are not among the labels {labels}: add them to the labels or "
                            "fix the data")
    per_class = per_class_metrics(gold, predicted, labels)
    present = [label for label in labels if per_class[label]["support"] or per_class[label]["predicted"]]
    tp = sum(row["true_positives"] for row in per_class.values())
    in_set = sum(p in per_class for p in predicted)
    micro_precision, micro_recall = _div(tp, in_set), _div(tp, len(gold))
    result = {
        "n": len(gold),
        "labels": labels,
        "accuracy": accuracy(gold, predicted),
        "macro_precision": float(np.mean([per_class[c]["precision"] for c in present])),
        "macro_recall": float(np.mean([per_class[c]["recall"] for c in present])),
        "macro_f1": float(np.mean([per_class[c]["f1"] for c in present])),
        "micro_precision": micro_precision,
        "micro_recall": micro_recall,
        "micro_f1": _f1(micro_precision, micro_recall),
        "outside_labels": len(gold) - in_set,
        "per_class": per_class,
        "confusion": confusion_matrix(gold, predicted, labels),
    }
    if negative_label is not None:
        if negative_label not in labels:
            raise BadInputError(f"the negative label {negative_label!r} is not one of the labels {labels}")
        if len(labels) < 2:
            raise BadInputError("relevance metrics need at least one label besides the negative one")
        result["relevance"] = binary_relevance(gold, predicted, negative_label)
    if confidences is not None:
        correct = [g == p for g, p in zip(gold, predicted)]
        result["calibration"] = reliability_table(confidences, correct, n_bins)
        result["confidence"] = confidence_summary(confidences, correct)
    return result


# -------------------------------------------------------------------------------------------------- generation
#
# Exact match and token F1 follow the official SQuAD v2.0 evaluation script (a few lines, written out here and
# pinned to hand-computed examples of its definition). BLEU and chrF come from sacrebleu and ROUGE-L from
# rouge-score, the libraries whose numbers papers report (kdcache scales them to 0..1; sacrebleu reports 0..100).


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _references(refs: str | Sequence[str]) -> list[str]:
    if isinstance(refs, str):
        return [refs]
    refs = [str(r) for r in refs]
    if not refs:
        raise BadInputError("an example has an empty list of references")
    return refs


def _check_texts(predictions: Sequence[str], references: Sequence, what: str) -> None:
    if len(predictions) == 0:
        raise BadInputError(f"cannot compute {what} over no examples: the prediction list is empty")
    if len(predictions) != len(references):
        raise BadInputError(f"cannot compute {what}: {len(predictions)} predictions but {len(references)} references")


def exact_match_one(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1_one(prediction: str, reference: str) -> float:
    """SQuAD token F1 between one prediction and one reference (both empty after normalisation: 1, one empty: 0)."""
    pred_tokens, ref_tokens = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of max over references of normalised string equality."""
    _check_texts(predictions, references, "exact match")
    return float(np.mean([max(exact_match_one(p, r) for r in _references(refs))
                          for p, refs in zip(predictions, references)]))


def token_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of max over references of SQuAD token F1."""
    _check_texts(predictions, references, "token F1")
    return float(np.mean([max(token_f1_one(p, r) for r in _references(refs))
                          for p, refs in zip(predictions, references)]))


LIBRARY_HINT = "pip install 'kdcache[eval]' (sacrebleu and rouge-score)"


def check_generation_libraries() -> None:
    """Raise a BadInputError naming the install command when sacrebleu or rouge-score is missing."""
    import importlib.util

    missing = [name for name, module in (("sacrebleu", "sacrebleu"), ("rouge-score", "rouge_score"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise BadInputError(f"generation metrics need {' and '.join(missing)} (not installed): {LIBRARY_HINT}")


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
            use_stemmer: bool = True) -> float:
    """Mean over examples of max over references of rouge-score's ROUGE-L F-measure, on a 0..1 scale.

    rouge-score lower-cases, keeps runs of a-z0-9 as tokens (other characters, accented and non-Latin letters
    included, separate tokens and are dropped) and, with `use_stemmer`, applies the Porter stemmer. The default
    (stemmer on, max over references) is the Super-NaturalInstructions script that MiniLLM and DistiLLM report.
    """
    _check_texts(predictions, references, "ROUGE-L")
    check_generation_libraries()
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return float(np.mean([scorer.score_multi(_references(refs), p)["rougeL"].fmeasure
                          for p, refs in zip(predictions, references)]))


BLEU_SMOOTHING = ("none", "floor", "add-k", "exp")


def _reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's reference streams, padded with None where an example has fewer."""
    per_example = [_references(refs) for refs in references]
    width = max(len(refs) for refs in per_example)
    return [[refs[i] if i < len(refs) else None for refs in per_example] for i in range(width)]


def corpus_bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], smoothing: str = "exp",
                smooth_value: float | None = None, lowercase: bool = False) -> dict:
    """sacrebleu's corpus BLEU (tokenizer 13a, 4-grams) on a 0..1 scale, with its precisions, counts and signature.

    `smoothing` is sacrebleu's smooth_method: `exp` (its default), `floor`, `add-k` or `none`; `smooth_value` its
    smooth_value (None: sacrebleu's default). Precisions are on 0..1 as well.
    """
    _check_texts(predictions, references, "BLEU")
    if smoothing not in BLEU_SMOOTHING:
        raise BadInputError(f"bleu_smoothing must be one of {list(BLEU_SMOOTHING)}, got {smoothing!r}")
    check_generation_libraries()
    from sacrebleu.metrics import BLEU

    metric = BLEU(smooth_method=smoothing, smooth_value=smooth_value, lowercase=lowercase)
    score = metric.corpus_score([str(p) for p in predictions], _reference_streams(references))
    return {"bleu": score.score / 100, "precisions": [p / 100 for p in score.precisions],
            "brevity_penalty": score.bp, "hyp_length": score.sys_len, "ref_length": score.ref_len,
            "smoothing": smoothing, "signature": str(metric.get_signature())}


def corpus_chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """sacrebleu's corpus chrF (character 6-grams, beta 2, no word n-grams) on a 0..1 scale, with its signature."""
    _check_texts(predictions, references, "chrF")
    check_generation_libraries()
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    score = metric.corpus_score([str(p) for p in predictions], _reference_streams(references))
    return {"chrf": score.score / 100, "signature": str(metric.get_signature())}


def generation_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                       bleu_smoothing: str = "exp", rouge_stemmer: bool = True) -> dict:
    """Exact match and token F1 (SQuAD), ROUGE-L (rouge-score), corpus BLEU and chrF (sacrebleu), all on 0..1."""
    _check_texts(predictions, references, "generation metrics")
    bleu = corpus_bleu(predictions, references, smoothing=bleu_smoothing)
    chrf = corpus_chrf(predictions, references)
    return {
        "n": len(predictions),
        "exact_match": exact_match(predictions, references),
        "token_f1": token_f1(predictions, references),
        "rouge_l": rouge_l(predictions, references, use_stemmer=rouge_stemmer),
        "bleu": bleu["bleu"],
        "chrf": chrf["chrf"],
        "bleu_details": bleu,
        "chrf_signature": chrf["signature"],
        "rouge_stemmer": rouge_stemmer,
    }


# ----------------------------------------------------------------------------------------------------- helpers


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    values = list(values)
    if not values:
        raise BadInputError("cannot take a percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
