"""PNG plots with matplotlib's Agg backend: confusion matrices, reliability diagrams, the cascade curve."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return path


def confusion_matrices(panels: Sequence[tuple[str, dict]], path: str | Path) -> Path:
    """One heat map per (title, confusion dict from metrics.json), side by side, counts written in the cells."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (title, confusion) in zip(axes[0], panels):
        matrix = confusion["matrix"]
        rows, cols = confusion["gold_labels"], confusion["predicted_labels"]
        peak = max((max(r) for r in matrix if r), default=0) or 1
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=peak, aspect="auto")
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center",
                        color="white" if count > 0.6 * peak else "black", fontsize=9)
        ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), labels=rows)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return _save(fig, path)


def reliability_diagram(runs: Sequence[tuple[str, dict]], path: str | Path) -> Path:
    """Accuracy against mean confidence per bin for each (name, calibration dict), with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for name, calibration in runs:
        points = [(b["mean_confidence"], b["accuracy"], b["count"]) for b in calibration["bins"] if b["count"]]
        if not points:
            continue
        xs, ys, counts = zip(*points)
        total = sum(counts)
        label = f"{name + ': ' if name else ''}ECE {calibration['ece']:.3f}"
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        ax.scatter(xs, ys, s=[20 + 300 * c / total for c in counts], alpha=0.3, color=line.get_color())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean in bin)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def cascade_plot(cascade: dict, path: str | Path, names: tuple[str, str] = ("A", "B")) -> Path:
    """Cascade accuracy against the share of examples the student keeps, with both models' accuracy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    curve = cascade["curve"]
    ax.plot([p["kept_share"] for p in curve], [p["accuracy"] for p in curve], marker=".", label="cascade")
    ax.axhline(cascade["teacher_accuracy"], color="tab:green", linestyle=":", label=f"{names[0]} alone")
    ax.axhline(cascade["student_accuracy"], color="tab:red", linestyle=":", label=f"{names[1]} alone")
    chosen = cascade.get("chosen")
    if cascade.get("target_accuracy") is not None:
        ax.axhline(cascade["target_accuracy"], color="grey", linestyle="--", label="target")
    if chosen:
        ax.scatter([chosen["kept_share"]], [chosen["accuracy"]], color="black", zorder=3,
                   label=f"chosen: keep {chosen['kept_share']:.0%}")
    values = [p["accuracy"] for p in curve] + [cascade["teacher_accuracy"], cascade["student_accuracy"]]
    if cascade.get("target_accuracy") is not None:
        values.append(cascade["target_accuracy"])
    ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.05))
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share kept by {names[1]} (confidence >= threshold)")
    ax.set_ylabel("cascade accuracy")
    ax.set_title(f"cascade: {names[1]} first, {names[0]} for the rest")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
