"""Evaluation: label scoring and generation, metrics, speed and size, reports, comparisons and cascades.

The CLI commands live in `kdcache.cli.eval` (`eval_command`, `compare_command`); docs/evaluation.md defines
every metric, the success-criteria schema and the cascade.
"""

from kdcache.eval.cascade import cascade_curve, cascade_from_predictions, choose_threshold
from kdcache.eval.compare import CompareResult, compare_runs, load_run
from kdcache.eval.criteria import CheckResult, Criterion, check_criteria, load_criteria, metric_value, parse_criteria
from kdcache.eval.runner import EvalConfig, EvalResult, run_eval, strip_timing
from kdcache.eval.scoring import label_probabilities, label_token_ids, load_model, parse_label, score_labels

__all__ = [
    "CheckResult", "CompareResult", "Criterion", "EvalConfig", "EvalResult", "cascade_curve",
    "cascade_from_predictions", "check_criteria", "choose_threshold", "compare_runs", "label_probabilities",
    "label_token_ids", "load_criteria", "load_model", "load_run", "metric_value", "parse_criteria", "parse_label",
    "run_eval", "score_labels", "strip_timing",
]
