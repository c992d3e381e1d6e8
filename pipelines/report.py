"""Results of a pipeline: ``results.csv``, a Markdown table and PNG plots.

Runs of one variant (its ``seeds``) are aggregated into one row: every metric is the mean
over the runs, with its sample standard deviation in ``<metric>_std`` (shown as mean ± std
in the table) and the number of runs in ``seeds``; ``results_runs.csv`` then lists the runs.
``frontier.png`` plots MLP (else kNN) top-1 against teacher forwards (log x) when the
variants spent different numbers of teacher forwards (issue 12's views budget).
"""
from __future__ import annotations

import csv
import statistics
import textwrap
from pathlib import Path
from typing import Any

LABELS = ("variant", "run", "description")
COST_COLUMNS = ("epochs", "teacher_fwd", "cache_gb")  # equal across seeds: no spread shown


def _rank(column: str) -> tuple[int, str]:
    """Accuracies first, then fidelity, the seed count, costs; alphabetical within a kind, and
    ``<metric>_std`` right after its metric."""
    if column.endswith("_std"):
        kind, name = _rank(column[: -len("_std")])
        return kind, name + "~std"
    if column.endswith(("_top1", "_top5", "_box_ap", "_mask_ap")):
        return 0, column
    if column in COST_COLUMNS:
        return 3, f"{COST_COLUMNS.index(column)}"
    return (1 if column.startswith("fidelity") else 2 if column == "seeds" else 4), column


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for row in rows for k in row if k not in LABELS}, key=_rank)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: the mean of each metric over its runs, ``<metric>_std`` and ``seeds``
    when it has several runs; a variant with one run keeps its row (without ``run``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    out = []
    for variant, group in groups.items():
        merged: dict[str, Any] = {"variant": variant, "description": group[0].get("description", "")}
        for column in metric_columns(group):
            values = [r[column] for r in group if _number(r.get(column))]
            if values:
                merged[column] = float(statistics.fmean(values))
                if len(group) > 1:
                    merged[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else float("nan")
        if len(group) > 1:
            merged["seeds"] = len(group)
        out.append(merged)
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    labels = [c for c in LABELS if any(c in row for row in rows)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*labels, *metric_columns(rows)])
        writer.writeheader()
        writer.writerows(rows)


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if not _number(value):
        return "" if value is None else str(value)
    if column == "teacher_fwd" or column == "seeds":
        return f"{value:,.0f}"
    digits = 4 if column.startswith("fidelity") or column == "cache_gb" else 2
    text = f"{value:.{digits}f}"
    std = row.get(f"{column}_std")
    if _number(std) and column not in COST_COLUMNS:
        text += f" ± {std:.{digits}f}"
    return text


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    columns = [c for c in metric_columns(rows) if not c.endswith("_std")]
    lines = [f"## {title}", "", "| variant | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['variant']} | " + " | ".join(_cell(row, c) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def set_title(ax: Any, fig: Any, title: str, fontsize: float = 11) -> None:
    """The title wrapped to the figure's width (a long one is never clipped, issue 10)."""
    chars_per_line = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    ax.set_title("\n".join(textwrap.wrap(title, chars_per_line)), fontsize=fontsize)


def bar_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One group of bars per top-1 metric, one bar per variant (error bars: std over seeds)."""
    plt = _pyplot()
    metrics = [c for c in metric_columns(rows) if c.endswith("top1")]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.45 * len(rows) * max(1, len(metrics)))), 4.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = [row[m] if _number(row.get(m)) else float("nan") for m in metrics]  # missing: no bar
        errors = [row[f"{m}_std"] if _number(row.get(f"{m}_std")) else 0.0 for m in metrics]
        bars = ax.bar([j + i * width for j in range(len(metrics))], values, width, label=row["variant"],
                      color=plt.cm.tab20(i % 20), yerr=errors if any(errors) else None, error_kw={"lw": 0.8})
        ax.bar_label(bars, labels=["" if v != v else f"{v:.1f}" for v in values], fontsize=6, rotation=90)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.margins(y=0.1)  # room for the value labels above the tallest bar
    set_title(ax, fig, title)
    ax.legend(fontsize=7, ncol=max(1, len(rows) // 8), loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier_metric(rows: list[dict[str, Any]]) -> str | None:
    """The quality axis of the frontier plot, or None when there is no cost comparison to plot."""
    spent = {row["teacher_fwd"] for row in rows if _number(row.get("teacher_fwd")) and row["teacher_fwd"] > 0}
    if len(spent) < 2:
        return None
    return next((m for m in ("mlp_top1", "knn_top1") if any(_number(r.get(m)) for r in rows)), None)


def frontier_plot(rows: list[dict[str, Any]], path: Path, title: str, metric: str) -> None:
    """Quality against teacher forwards (log x), one marker per variant, std over seeds as error bars;
    colour = schedule length (``epochs``)."""
    plt = _pyplot()
    points = [r for r in rows if _number(r.get(metric)) and _number(r.get("teacher_fwd")) and r["teacher_fwd"] > 0]
    schedules = sorted({r.get("epochs") for r in points if _number(r.get("epochs"))})
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(points):
        colour = plt.cm.tab10(schedules.index(row["epochs"]) % 10) if row.get("epochs") in schedules else "grey"
        std = row.get(f"{metric}_std")
        ax.errorbar(row["teacher_fwd"], row[metric], yerr=std if _number(std) and std == std else None,
                    fmt="o", color=colour, capsize=3, ms=5)
        ax.annotate(row["variant"], (row["teacher_fwd"], row[metric]), textcoords="offset points",
                    xytext=(4, 4 if i % 2 else -9), fontsize=7)
    for s, epochs in enumerate(schedules):
        ax.plot([], [], "o", color=plt.cm.tab10(s % 10), label=f"{epochs:g} epochs (image passes)")
    ax.set_xscale("log")
    ax.set_xlabel("teacher forwards (log scale)")
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.grid(True, which="both", alpha=0.3)
    if schedules:
        ax.legend(fontsize=8, loc="lower right")
    set_title(ax, fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out_dir: Path, title: str) -> dict[str, Path]:
    """``rows``: one per run (``variant`` names its row); returns the paths written."""
    table = aggregate(rows)
    paths = {"csv": out_dir / "results.csv", "md": out_dir / "results.md", "png": out_dir / "results.png"}
    write_csv(table, paths["csv"])
    if len(table) < len(rows):
        paths["runs_csv"] = out_dir / "results_runs.csv"
        write_csv(rows, paths["runs_csv"])
    paths["md"].write_text(markdown_table(table, title))
    bar_plot(table, paths["png"], title)
    metric = frontier_metric(table)
    if metric:
        paths["frontier"] = out_dir / "frontier.png"
        frontier_plot(table, paths["frontier"], f"{title}: {metric} against teacher forwards", metric)
    return paths
