"""Metrics for SEE experiments.

Three families of numbers are computed here:

1. Answer quality: ROUGE-L F-measure in points (0-100), as used by the SuperNI
   benchmark, which scores a prediction against the *best* of its references.
2. Continual-learning summaries of a score matrix ``R[s][j]`` (score on task j
   after training stage s): average performance (AP), backward transfer (BWT)
   and forgetting rate (F.Ra).
3. Routing quality: who answered each query (an expert, named after its task,
   or the fallback "base" model), giving a confusion matrix, routing accuracy,
   OOD rejection rate and false-rejection rate.

Plot helpers at the bottom write PNG figures; matplotlib is imported lazily so
that importing this module stays cheap and works on headless machines.
"""

from __future__ import annotations

from typing import Optional, Sequence

from see_ray.config.constants import BASE


# ---------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------

# One shared scorer: building a RougeScorer sets up a tokenizer and stemmer, so
# we create it once, on first use, rather than per call or at import time.
_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        # Stemming matches the SuperNI evaluation setup ("answers" ~ "answer").
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure in points (0-100), best over ``references``.

    SuperNI scores a prediction against each reference and keeps the maximum,
    because any one of the references is an acceptable answer.
    """
    if isinstance(references, str):
        # A bare string would otherwise be iterated character by character.
        references = [references]
    if not prediction or not prediction.strip() or not references:
        return 0.0
    scorer = _scorer()
    best = 0.0
    for ref in references:
        # score(target, prediction): the reference is the target.
        f = scorer.score(ref, prediction)["rougeL"].fmeasure
        best = max(best, f)
    return 100.0 * best


def mean_rouge_l(
    predictions: Sequence[str], references_list: Sequence[Sequence[str]]
) -> float:
    """Mean of :func:`rouge_l` over paired predictions and reference lists, in points."""
    if len(predictions) != len(references_list):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references_list)} reference lists"
        )
    if not predictions:
        return 0.0
    total = sum(rouge_l(p, refs) for p, refs in zip(predictions, references_list))
    return total / len(predictions)


# ---------------------------------------------------------------------------
# Continual-learning score matrix
# ---------------------------------------------------------------------------

# R[s][j] = score on task j after training stage s, for s, j in 0..T-1.
# Entries with j > s (tasks not yet trained) may be None: they are not needed
# by AP/BWT/F.Ra. Every entry with j <= s must be present.
ScoreMatrix = list[list[Optional[float]]]


def _check(R: ScoreMatrix) -> int:
    """Validate R and return T. Raise ValueError on any missing needed entry."""
    T = len(R)
    if T == 0:
        raise ValueError("score matrix is empty")
    for s, row in enumerate(R):
        if len(row) != T:
            raise ValueError(
                f"score matrix must be {T}x{T}; row {s} has {len(row)} entries"
            )
        for j in range(s + 1):
            if row[j] is None:
                raise ValueError(
                    f"score matrix is missing R[{s}][{j}] (task {j} after stage {s})"
                )
    return T


def average_performance(R: ScoreMatrix) -> float:
    """AP: mean over all tasks j of the final-stage score R[T-1][j]."""
    T = _check(R)
    last = R[T - 1]
    return sum(last) / T  # type: ignore[arg-type]  # _check guarantees no None


def backward_transfer(R: ScoreMatrix) -> Optional[float]:
    """BWT: mean over j < T-1 of R[T-1][j] - R[j][j].

    How much the score on a task changed between just after learning it and
    the end. Negative means forgetting. Undefined (None) with a single task.
    """
    T = _check(R)
    if T == 1:
        return None
    diffs = [R[T - 1][j] - R[j][j] for j in range(T - 1)]  # type: ignore[operator]
    return sum(diffs) / len(diffs)


def forgetting_rate(R: ScoreMatrix) -> Optional[float]:
    """F.Ra: mean over j < T-1 of (best earlier score on j) - R[T-1][j].

    "Best earlier" is the max over stages s in j..T-2 — only stages after task j
    was learned count, since before that it was not evaluated (None). Undefined
    (None) with a single task.
    """
    T = _check(R)
    if T == 1:
        return None
    drops = []
    for j in range(T - 1):
        best = max(R[s][j] for s in range(j, T - 1))  # type: ignore[type-var]
        drops.append(best - R[T - 1][j])  # type: ignore[operator]
    return sum(drops) / len(drops)


def summarize(R: ScoreMatrix) -> dict:
    """AP, BWT and F.Ra of R in one dict (None where undefined)."""
    return {
        "ap": average_performance(R),
        "bwt": backward_transfer(R),
        "fra": forgetting_rate(R),
    }


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------
# Expert names equal task names, so a query is routed correctly when the name
# of whoever answered it equals its true task. BASE marks the fallback model.


def routing_confusion(
    true_tasks: list[str], routed_to: list[str], labels: list[str]
) -> dict:
    """Count matrix: row = true task, column = who answered (labels + "base").

    The matrix is square over labels + ["base"], so OOD queries can be passed
    with true task "base" (their correct destination) and land in the last row.
    """
    if len(true_tasks) != len(routed_to):
        raise ValueError(
            f"{len(true_tasks)} true tasks but {len(routed_to)} routing decisions"
        )
    all_labels = list(labels) + [BASE]
    index = {name: i for i, name in enumerate(all_labels)}
    matrix = [[0] * len(all_labels) for _ in all_labels]
    for true, routed in zip(true_tasks, routed_to):
        if true not in index:
            raise ValueError(f"true task {true!r} not in labels {all_labels}")
        if routed not in index:
            raise ValueError(f"routed-to {routed!r} not in labels {all_labels}")
        matrix[index[true]][index[routed]] += 1
    return {"labels": all_labels, "matrix": matrix}


def routing_accuracy(true_tasks: list[str], routed_to: list[str]) -> float:
    """Share of queries answered by the expert of their own task."""
    if len(true_tasks) != len(routed_to):
        raise ValueError(
            f"{len(true_tasks)} true tasks but {len(routed_to)} routing decisions"
        )
    if not true_tasks:
        return 0.0
    hits = sum(1 for t, r in zip(true_tasks, routed_to) if t == r)
    return hits / len(true_tasks)


def _share_base(routed_to: Sequence[str]) -> float:
    if not routed_to:
        return 0.0
    return sum(1 for r in routed_to if r == BASE) / len(routed_to)


def ood_rejection_rate(routed_to_for_ood_queries: Sequence[str]) -> float:
    """Share of out-of-distribution queries that reached the base model (higher is better)."""
    return _share_base(routed_to_for_ood_queries)


def false_rejection_rate(routed_to_for_in_distribution: Sequence[str]) -> float:
    """Share of in-distribution queries wrongly sent to the base model (lower is better)."""
    return _share_base(routed_to_for_in_distribution)


# ---------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------


def _pyplot():
    # Import lazily and force the non-interactive Agg backend: plots are
    # written on headless machines and the import is slow.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_score_matrix(
    R: ScoreMatrix, task_labels: Sequence[str], title: str, path: str
) -> None:
    """Heatmap of R (rows = stage, columns = task) with values written in; None cells stay blank."""
    plt = _pyplot()
    import numpy as np

    T = len(R)
    data = np.array(
        [[np.nan if v is None else float(v) for v in row] for row in R], dtype=float
    )
    # Floor of 6x5 inches so that titles and tick labels fit even for one or two tasks.
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.9 * T), max(5.0, 2.0 + 0.8 * T)))
    # Masked cells (NaN) are not painted, so untrained tasks appear blank.
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100)
    for s in range(T):
        for j in range(len(R[s])):
            if R[s][j] is not None:
                ax.text(j, s, f"{R[s][j]:.1f}", ha="center", va="center",
                        color="white", fontsize=8)
    _label_and_save(plt, fig, ax, im, task_labels, [f"after {lab}" for lab in task_labels[:T]],
                    "evaluated task", "training stage", title, path)


def plot_confusion(confusion_dict: dict, title: str, path: str) -> None:
    """Heatmap of a :func:`routing_confusion` result with counts written in."""
    plt = _pyplot()
    import numpy as np

    labels = confusion_dict["labels"]
    data = np.array(confusion_dict["matrix"], dtype=float)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.9 * n), max(5.0, 2.0 + 0.8 * n)))
    im = ax.imshow(data, cmap="Blues")
    vmax = data.max() if data.size else 0
    for i in range(data.shape[0]):
        for k in range(data.shape[1]):
            count = int(data[i, k])
            # Dark text on light cells, light text on dark cells.
            color = "white" if vmax and count > vmax / 2 else "black"
            ax.text(k, i, str(count), ha="center", va="center", color=color,
                    fontsize=8)
    # The matrix is square over labels + "base": the "base" row holds OOD
    # queries (true destination = base model) when the caller includes them.
    _label_and_save(plt, fig, ax, im, labels, labels, "answered by", "true task", title, path)


def _label_and_save(plt, fig, ax, im, xlabels, ylabels, xlabel: str, ylabel: str, title: str, path: str) -> None:
    """Tick labels, axis labels, title and colour bar of a heatmap, then write it to ``path``."""
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, rotation=45, ha="right")
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(ylabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
