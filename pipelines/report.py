"""Results of a pipeline: ``results.csv``, a Markdown table and a PNG bar plot."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({k for row in rows for k in row if k not in ("variant", "description")})


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = ["variant", "description", *metric_columns(rows)]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    columns = metric_columns(rows)
    lines = [f"## {title}", "", "| variant | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One group of bars per top-1 metric, one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in metric_columns(rows) if c.endswith("top1")]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.45 * len(rows) * max(1, len(metrics)))), 4.5))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        values = [row[m] if isinstance(row.get(m), float) else float("nan") for m in metrics]  # missing: no bar
        bars = ax.bar([j + i * width for j in range(len(metrics))], values, width, label=row["variant"],
                      color=plt.cm.tab20(i % 20))
        ax.bar_label(bars, labels=["" if v != v else f"{v:.1f}" for v in values], fontsize=6, rotation=90)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(metrics))], metrics)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=max(1, len(rows) // 8), loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out_dir: Path, title: str) -> dict[str, Path]:
    paths = {"csv": out_dir / "results.csv", "md": out_dir / "results.md", "png": out_dir / "results.png"}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown_table(rows, title))
    bar_plot(rows, paths["png"], title)
    return paths
