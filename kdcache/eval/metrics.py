"""Evaluation metrics written out in plain Python/numpy, each defined in docs/evaluation.md.

Classification: accuracy, per-class precision/recall/F1, macro and micro averages, confusion matrix, binary
relevance metrics (everything but a negative class counts as "relevant"), expected calibration error with a
reliability table, and average confidence on right and wrong answers.
Generation: exact match and token F1 (SQuAD normalisation), ROUGE-L (LCS F-measure) and corpus BLEU.

Every function refuses empty input with a BadInputError: a metric over nothing is not zero, it is undefined.
"""

from __future__ import annotations

import math
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


def rouge_tokens(text: str) -> list[str]:
    """ROUGE tokenisation: lower case, anything not a letter or digit separates tokens."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_one(prediction: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F: P = LCS/len(pred), R = LCS/len(ref), F = (1 + b^2) P R / (R + b^2 P)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]], beta: float = 1.0) -> float:
    """Mean over examples of max over references of ROUGE-L F."""
    _check_texts(predictions, references, "ROUGE-L")
    return float(np.mean([max(rouge_l_one(p, r, beta) for r in _references(refs))
                          for p, refs in zip(predictions, references)]))


def bleu_tokens(text: str, lowercase: bool = False) -> list[str]:
    """BLEU tokenisation: words (letters, digits, underscore) and single punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower() if lowercase else text)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


BLEU_SMOOTHING = ("none", "floor", "add-k", "exp")


def corpus_bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4,
                smoothing: str = "exp", smooth_value: float | None = None, lowercase: bool = False) -> dict:
    """Corpus BLEU (Papineni et al. 2002) on a 0..1 scale, with the counts that produce it.

    Modified n-gram precision p_n = sum of clipped n-gram matches / sum of hypothesis n-grams over the corpus, for
    n = 1..max_n (a hypothesis n-gram count is clipped at its largest count in any one reference).
    BLEU = BP * exp(mean_n log p_n), BP = 1 if c > r else exp(1 - r / c), where c is the total hypothesis length
    and r the sum of the reference lengths closest to each hypothesis (the shorter one on ties).
    Smoothing of zero precisions (names as in sacrebleu): `none` (BLEU 0), `floor` (a zero match count becomes
    smooth_value, default 0.1), `add-k` (k = smooth_value, default 1, added to matches and totals for n >= 2),
    `exp` (the i-th zero precision becomes 1 / (2^i * total); the default).
    """
    _check_texts(predictions, references, "BLEU")
    if smoothing not in BLEU_SMOOTHING:
        raise BadInputError(f"unknown BLEU smoothing {smoothing!r}; choose one of {list(BLEU_SMOOTHING)}")
    if max_n < 1:
        raise BadInputError(f"BLEU max_n must be at least 1, got {max_n}")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_length = ref_length = 0
    for prediction, refs in zip(predictions, references):
        hyp = bleu_tokens(prediction, lowercase)
        ref_tokens = [bleu_tokens(r, lowercase) for r in _references(refs)]
        hyp_length += len(hyp)
        ref_length += min((abs(len(r) - len(hyp)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in ref_tokens:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(count, max_ref[gram]) for gram, count in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    precisions, log_sum, zero_seen = [], 0.0, 0
    score_is_zero = hyp_length == 0
    for n in range(max_n):
        match, total = float(matches[n]), float(totals[n])
        if smoothing == "add-k" and n >= 1:
            k = 1.0 if smooth_value is None else smooth_value
            match, total = match + k, total + k
        if total == 0:
            precision = 0.0
        elif match > 0:
            precision = match / total
        elif smoothing == "floor":
            precision = (0.1 if smooth_value is None else smooth_value) / total
        elif smoothing == "exp":
            zero_seen += 1
            precision = 1.0 / (2**zero_seen * total)
        else:
            precision = 0.0
        precisions.append(precision)
        if precision <= 0:
            score_is_zero = True
        else:
            log_sum += math.log(precision)
    if hyp_length == 0:
        brevity = 0.0
    else:
        brevity = 1.0 if hyp_length > ref_length else math.exp(1 - ref_length / hyp_length)
    bleu = 0.0 if score_is_zero else brevity * math.exp(log_sum / max_n)
    return {"bleu": bleu, "precisions": precisions, "brevity_penalty": brevity, "hyp_length": hyp_length,
            "ref_length": ref_length, "max_n": max_n, "smoothing": smoothing}


def generation_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                       bleu_smoothing: str = "exp") -> dict:
    """Exact match, token F1, ROUGE-L and corpus BLEU of generated texts against references (str or list)."""
    _check_texts(predictions, references, "generation metrics")
    bleu = corpus_bleu(predictions, references, smoothing=bleu_smoothing)
    return {
        "n": len(predictions),
        "exact_match": exact_match(predictions, references),
        "token_f1": token_f1(predictions, references),
        "rouge_l": rouge_l(predictions, references),
        "bleu": bleu["bleu"],
        "bleu_details": bleu,
    }


# ----------------------------------------------------------------------------------------------------- helpers


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    values = list(values)
    if not values:
        raise BadInputError("cannot take a percentile of no values")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
