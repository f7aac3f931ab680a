"""Evaluation results in the shapes of the LD-ZNet paper's tables, as markdown and as JSON.

- Table 1 (PhraseCut test): Method | mIoU | IoU_FG | AP, plus PhraseCut's own mean and
  cumulative IoU at the binary threshold (not in the paper's table; its evaluator's metrics);
- Table 2 (AIGI): Method | mIoU | AP;
- Table 3 (RefCOCO, RefCOCO+, G-Ref): one row per method, per data set IoU and AP. The paper does
  not say which IoU; it follows CLIPSeg's methodology, so this is its mIoU (best threshold);
- Table 4 (concatenation ablation): as Table 1, first column "Diffusion features via".

Values are x 100 with one decimal in markdown and unrounded (x 100) in JSON. Rows are methods
(the result's name) in first-seen order; tables 1, 2 and 4 get a data column when the results
cover more than one data set.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import LdznetError
from .evaluate import EvalResult

FULL = (("mIoU", "miou"), ("IoU_FG", "iou_fg"), ("AP", "ap"), ("mean IoU", "mean_iou"), ("cum IoU", "cumulative_iou"))

TABLES: dict[int, tuple[str, str, tuple[tuple[str, str], ...]]] = {
    1: ("Text-based image segmentation (PhraseCut test, paper Table 1)", "Method", FULL),
    2: ("Generalization to AI-generated images (AIGI, paper Table 2)", "Method", (("mIoU", "miou"), ("AP", "ap"))),
    3: ("Generalization to referring expressions (paper Table 3)", "Method", (("IoU", "miou"), ("AP", "ap"))),
    4: ("Diffusion features via cross-attention or concatenation (paper Table 4)", "Diffusion features via", FULL),
}
"""Table number -> (title, first column, (column label, MetricSummary field) ...)."""
EARLIER_TABLE = re.compile(r"\s*(?:" + "|".join(re.escape(title) for title, _, _ in TABLES.values()) + ")\n")
"""How a markdown file that ``eval --markdown`` wrote begins (a table's title): only such a file is replaced."""


def dataset_label(data: str) -> str:
    """A short column label for a source description: its prefix and last part
    ('refcoco:/d/refcoco:val (unc)' -> 'refcoco val (unc)')."""
    prefix, _, rest = data.partition(":")
    last = rest.rpartition(":")[2] if rest else ""
    return f"{prefix} {last}".strip() if prefix in ("refcoco", "refcoco+", "refcocog", "phrasecut") else data


def build_table(results: Sequence[EvalResult], number: int) -> dict:
    """The table as JSON-able data: title, columns, rows (values x 100, None where missing)."""
    if number not in TABLES:
        raise LdznetError(f"table {number}: expected one of {', '.join(map(str, TABLES))}")
    title, first, metrics = TABLES[number]
    summaries = {(r.name, r.data): r.summary.to_dict() for r in results}
    methods = list(dict.fromkeys(r.name for r in results))
    datasets = list(dict.fromkeys(r.data for r in results))
    if number == 3:
        columns = [first] + [f"{dataset_label(d)} {label}" for d in datasets for label, _ in metrics]
        rows = [[m] + [100 * summaries[m, d][key] if (m, d) in summaries else None for d in datasets
                       for _, key in metrics] for m in methods]
    else:
        columns = [first] + ["data"] * (len(datasets) > 1) + [label for label, _ in metrics]
        rows = [[name] + [data] * (len(datasets) > 1) + [100 * summaries[name, data][key] for _, key in metrics]
                for name, data in summaries]
    return {"table": number, "title": title, "columns": columns, "rows": rows,
            "data": datasets, "counts": {f"{n} | {d}": s["count"] for (n, d), s in summaries.items()}}


def markdown_table(table: dict) -> str:
    """The table of ``build_table`` as markdown (numbers with one decimal, '-' where missing)."""
    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        return " ".join(str(value).split()).replace("|", "\\|")  # a name's '|' or line break would split the row

    numeric = [not isinstance(v, str) for v in table["rows"][0]] if table["rows"] else []
    lines = [f"| {' | '.join(cell(c) for c in table['columns'])} |",
             "|" + "|".join("---:" if numeric and numeric[i] else "---" for i in range(len(table["columns"]))) + "|"]
    lines += [f"| {' | '.join(cell(v) for v in row)} |" for row in table["rows"]]
    return "\n".join(lines)


def default_table(results: Sequence[EvalResult]) -> int:
    """Table 3 when the results cover several RefCOCO-family data sets, else Table 1."""
    refer = {r.data for r in results if r.data.partition(":")[0] in ("refcoco", "refcoco+", "refcocog")}
    return 3 if len(refer) > 1 else 1
