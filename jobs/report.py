"""`graftq report`: one self-contained HTML page that compares the jobs of some batches.

The charts are matplotlib figures inlined as SVG, so the file needs no network, no script and
no font download to be read, and a given database gives the same bytes every time. Only
`graftq report` imports this module (matplotlib is the `report` extra).

    html = render_report([BatchData(...)], Metric("eval_loss", maximize=False))
"""

from __future__ import annotations

import html
import io
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from db.conditions import as_number

SEED_KEY = "train.seed"
#: Per batch: loss-curve charts drawn (one per task and extension), lines per chart, bars of the
#: seed chart, heatmaps. What is left out is counted on the page.
MAX_CURVE_CHARTS = 12
MAX_LINES_PER_CHART = 10
MAX_SEED_GROUPS = 30
MAX_HEATMAPS = 6
#: Metrics whose higher values are better; any other name ending in one of LOWER_IS_BETTER's
#: words is a cost. A name in neither needs --maximize or --minimize.
HIGHER_IS_BETTER = frozenset({
    "accuracy", "exact_match", "char_accuracy", "token_accuracy", "f1", "bleu", "rouge_l", "rouge1", "rouge2",
    "rougeL", "chrf", "precision", "recall", "tokens_per_second",
})
LOWER_IS_BETTER = ("loss", "perplexity", "seconds", "memory_mb", "error", "wer", "cer", "ter")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
EXTENSION_COLORS = {"lora": "#1f77b4", "layer": "#ff7f0e", "hybrid": "#2ca02c"}


@dataclass(frozen=True)
class Metric:
    """The value the report compares jobs by: a numeric result field or a task metric."""

    name: str
    maximize: bool

    def value(self, row: Mapping[str, Any]) -> float | None:
        """The job's value: its result field `name`, else `metrics[name]`; None when it has none."""
        name = self.name.removeprefix("metric.")
        raw = row.get(self.name) if self.name in row else (row.get("metrics") or {}).get(name)
        number = as_number(raw)
        return number if number is not None and math.isfinite(number) else None

    @property
    def direction(self) -> str:
        return "higher is better" if self.maximize else "lower is better"


def metric_direction(name: str) -> bool | None:
    """Whether higher values of metric `name` are better (True), lower (False), or unknown (None)."""
    from jobs.metrics import METRICS

    bare = name.removeprefix("metric.")
    if bare in METRICS:  # the task-metric registry knows each of its metrics' direction
        return METRICS[bare].higher_is_better
    if bare in HIGHER_IS_BETTER or bare.startswith("rouge"):
        return True
    if any(bare == word or bare.endswith(word) for word in LOWER_IS_BETTER):
        return False
    return None


@dataclass
class BatchData:
    """One batch as the report reads it: result rows (`db.queries.result_rows`), loss curves and the task
    metrics' curves (`db.queries.metric_curves`: job id -> metric -> (step, value) points)."""

    batch_id: str
    name: str
    created_at: Any
    rows: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, str, float]]] = field(default_factory=dict)
    metric_curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)

    @property
    def succeeded(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] == "succeeded"]


def pareto_front(points: Sequence[tuple[float, float]], *, maximize: bool) -> list[int]:
    """Indices of the points no other point beats: fewer-or-equal trainable parameters (x) and a
    better-or-equal metric (y), one of them strictly. Sorted by x; of identical points the first."""
    sign = -1.0 if maximize else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1], i))
    front: list[int] = []
    best = math.inf
    for index in order:
        cost = sign * points[index][1]
        if cost < best:
            front.append(index)
            best = cost
    return front


def varying_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The params keys whose values differ among `rows` (a key missing from a row counts as a value)."""
    rows = list(rows)
    keys = sorted({key for row in rows for key in (row.get("params") or {})})
    return [key for key in keys if len({_key_text((row.get("params") or {}).get(key)) for row in rows}) > 1]


def seed_groups(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[Any, ...], list[Mapping[str, Any]]]:
    """Rows grouped by task, extension and every params key except `train.seed`, in first-seen order."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        params = {k: v for k, v in (row.get("params") or {}).items() if k != SEED_KEY}
        key = (row["task"], row["extension"], *sorted((k, _key_text(v)) for k, v in params.items()))
        groups.setdefault(key, []).append(row)
    return groups


def render_report(batches: Sequence[BatchData], metric: Metric, *, title: str = "graftq report") -> str:
    """The whole HTML page: a section per batch (empty batches say so)."""
    charts = _Charts()
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class=note>Metric: <b>{_e(metric.name)}</b> ({metric.direction}). Batches: {len(batches)}.</p>"]
    if not batches:
        body.append("<p>No batch matched.</p>")
    for batch in batches:
        body.append(_batch_section(batch, metric, charts))
    return _PAGE.format(title=_e(title), style=_STYLE, body="\n".join(body))


class _Charts:
    """Renders figures to inline SVG, each with its own id salt so ids never clash on the page."""

    def __init__(self) -> None:
        self.count = 0

    def svg(self, figure: Figure, label: str) -> str:
        self.count += 1
        with matplotlib.rc_context({"svg.hashsalt": f"graftq-report-{self.count}", "svg.fonttype": "none"}):
            buffer = io.StringIO()
            figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
        text = buffer.getvalue()
        # Inline SVG needs neither the XML prolog nor the DTD, and the RDF metadata only names URLs.
        text = text[text.index("<svg"):]
        text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
        return f'<figure class=chart data-chart="{_e(label)}">{text}</figure>'


def _batch_section(batch: BatchData, metric: Metric, charts: _Charts) -> str:
    # Jobs in a stable, readable order: legends, colours and tables follow the params.
    batch = BatchData(batch.batch_id, batch.name, batch.created_at, sorted(batch.rows, key=_job_order), batch.curves,
                      batch.metric_curves)
    counts: dict[str, int] = {}
    for row in batch.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "no jobs"
    parts = [f"<section class=batch><h2>Batch {_e(batch.name)} <small>{_e(batch.batch_id)} · "
             f"{_e(_when(batch.created_at))}</small></h2>", f"<p>{_e(summary)}.</p>"]
    if not batch.rows:
        parts.append("<p>This batch has no matching jobs.</p></section>")
        return "\n".join(parts)
    succeeded = batch.succeeded
    labels = _labels(batch.rows)
    parts += [_efficiency_table(succeeded), _curve_charts(batch, labels, charts),
              _metric_curve_charts(batch, labels, charts), _scatter(succeeded, metric, charts),
              _heatmaps(succeeded, metric, charts), _seed_summary(succeeded, metric, charts),
              _not_plotted(batch.rows, labels), "</section>"]
    return "\n".join(part for part in parts if part)


# --- parameter efficiency -----------------------------------------------------------------------------


def _efficiency_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per base model, task, extension and trainable count, with the hybrid ratios."""
    if not rows:
        return ""
    configs: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = (row["base_model"], row["task"], row["extension"], row["trainable_params"])
        config = configs.setdefault(key, {"row": row, "jobs": 0})
        config["jobs"] += 1
    lines = []
    for (base, task, extension, trainable), config in sorted(configs.items(), key=lambda item: _sort_key(item[0])):
        row = config["row"]
        versus_lora = versus_layer = ""
        if extension == "hybrid":
            versus_lora = _ratio(trainable, _counterpart(configs, base, task, "lora", row.get("lora_params")))
            versus_layer = _ratio(trainable, _counterpart(configs, base, task, "layer", row.get("layer_params")))
        lines.append([base, task, extension, config["jobs"], _int(row["base_params"]), _int(trainable),
                      _pct(row["trainable_pct"]), versus_lora, versus_layer])
    columns = ["base model", "task", "extension", "jobs", "base params", "trainable", "% of base"]
    if not any(line[-1] or line[-2] for line in lines):
        return "<h3>Parameter efficiency</h3>" + _html_table(columns, [line[:-2] for line in lines],
                                                             numeric=range(3, 7))
    return ("<h3>Parameter efficiency</h3>"
            + _html_table(columns + ["hybrid ÷ LoRA", "hybrid ÷ layer"], lines, numeric=range(3, 9))
            + "<p class=note>A hybrid's ratios compare its trainable parameters with the LoRA (layer) job of the "
              "same task and base model that trains as many parameters as the hybrid's LoRA (layer) part, "
              "else with the smallest one.</p>")


def _counterpart(configs: Mapping[tuple[Any, ...], Any], base: str, task: str, extension: str,
                 part: int | None) -> int | None:
    sizes = sorted(trainable for (b, t, e, trainable) in configs
                   if (b, t, e) == (base, task, extension) and trainable is not None)
    if not sizes:
        return None
    return part if part in sizes else sizes[0]


def _ratio(numerator: int | None, denominator: int | None) -> str:
    if not numerator or not denominator:
        return ""
    return f"{numerator / denominator:.2f}×"


# --- loss curves ------------------------------------------------------------------------------------


def _curve_charts(batch: BatchData, labels: Mapping[str, str], charts: _Charts) -> str:
    """A chart per task and extension: each job's train loss (solid) and eval loss (dashed)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in batch.succeeded:
        if batch.curves.get(row["id"]):
            groups.setdefault((row["task"], row["extension"]), []).append(row)
    without = [row for row in batch.succeeded if not batch.curves.get(row["id"])]
    parts = ["<h3>Loss curves</h3>"]
    left_out = 0
    for index, ((task, extension), rows) in enumerate(sorted(groups.items())):
        if index >= MAX_CURVE_CHARTS:
            left_out += len(rows)
            continue
        left_out += max(0, len(rows) - MAX_LINES_PER_CHART)
        parts.append(charts.svg(_curve_figure(f"{task} · {extension}", rows[:MAX_LINES_PER_CHART],
                                              batch.curves, labels), f"curves {task} {extension}"))
    if not groups:
        parts.append("<p>No succeeded job recorded a loss curve.</p>")
    if left_out:
        parts.append(f"<p class=note>{left_out} job(s) not drawn: at most {MAX_CURVE_CHARTS} charts (one per task "
                     f"and extension) of {MAX_LINES_PER_CHART} jobs each.</p>")
    if without:
        parts.append(f"<p class=note>No loss curve: {_e(', '.join(labels[row['id']] for row in without))}.</p>")
    return "\n".join(parts)


def _curve_figure(title: str, rows: Sequence[Mapping[str, Any]], curves: Mapping[str, Any],
                  labels: Mapping[str, str]) -> Figure:
    figure = Figure(figsize=(7.5, 3.6))
    axes = figure.subplots()
    for color, row in zip(_cycle(COLORS), rows):
        points = curves[row["id"]]
        label: str | None = labels[row["id"]]  # one legend entry per job, whichever split it has
        for split, style in (("train", "-"), ("eval", "--")):
            steps = [step for step, s, _ in points if s == split]
            losses = [loss for _, s, loss in points if s == split]
            if steps:
                axes.plot(steps, losses, style, color=color, marker="o" if split == "eval" else None, markersize=4,
                          label=label)
                label = None
        if row.get("best_metric") == "eval_loss" and row.get("best_value") is not None:
            axes.plot([row["best_step"]], [row["best_value"]], "*", color=color, markersize=13, markeredgecolor="#222")
    # The line styles' key, drawn without data.
    axes.plot([], [], "-", color="#444", label="train (solid)")
    axes.plot([], [], "--", marker="o", markersize=4, color="#444", label="eval (dashed)")
    axes.set(title=title, xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure


# --- task-metric curves (train.eval_every) ---------------------------------------------------------------


def _metric_curve_charts(batch: BatchData, labels: Mapping[str, str], charts: _Charts) -> str:
    """A chart per task, extension and metric of the jobs that evaluated it during training; a job's kept
    step (`best_step`) is starred on the curve of the metric that chose it."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in batch.succeeded:
        for name in batch.metric_curves.get(row["id"], {}):
            groups.setdefault((row["task"], row["extension"], name), []).append(row)
    if not groups:
        return ""
    parts = ["<h3>Metric curves</h3>"]
    left_out = 0
    for index, ((task, extension, name), rows) in enumerate(sorted(groups.items())):
        if index >= MAX_CURVE_CHARTS:
            left_out += len(rows)
            continue
        left_out += max(0, len(rows) - MAX_LINES_PER_CHART)
        figure = _metric_curve_figure(f"{task} · {extension} · {name}", name, rows[:MAX_LINES_PER_CHART],
                                      batch.metric_curves, labels)
        parts.append(charts.svg(figure, f"metric curves {task} {extension} {name}"))
    if left_out:
        parts.append(f"<p class=note>{left_out} curve(s) not drawn: at most {MAX_CURVE_CHARTS} charts (one per task, "
                     f"extension and metric) of {MAX_LINES_PER_CHART} jobs each.</p>")
    parts.append("<p class=note>★ the kept step (keep: best) on the curve of the metric that chose it.</p>")
    return "\n".join(parts)


def _metric_curve_figure(title: str, name: str, rows: Sequence[Mapping[str, Any]],
                         curves: Mapping[str, Mapping[str, list[tuple[int, float]]]],
                         labels: Mapping[str, str]) -> Figure:
    figure = Figure(figsize=(7.5, 3.6))
    axes = figure.subplots()
    for color, row in zip(_cycle(COLORS), rows):
        points = curves[row["id"]][name]
        axes.plot([step for step, _ in points], [value for _, value in points], "-", color=color, marker="o",
                  markersize=4, label=labels[row["id"]])
        best = dict(points).get(row.get("best_step")) if row.get("best_metric") == name else None
        if best is not None:
            axes.plot([row["best_step"]], [best], "*", color=color, markersize=13, markeredgecolor="#222")
    axes.set(title=title, xlabel="step", ylabel=name)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure


# --- metric versus trainable parameters ------------------------------------------------------------------


def _scatter(rows: Sequence[Mapping[str, Any]], metric: Metric, charts: _Charts) -> str:
    points = [(row, row["trainable_params"], metric.value(row)) for row in rows]
    drawn = [(row, x, y) for row, x, y in points if x and y is not None]
    heading = f"<h3>{_e(metric.name)} versus trainable parameters</h3>"
    if not drawn:
        return heading + f"<p>No succeeded job has both a {_e(metric.name)} and a trainable-parameter count.</p>"
    front = pareto_front([(float(x), y) for _, x, y in drawn], maximize=metric.maximize)
    figure = Figure(figsize=(7.5, 4.2))
    axes = figure.subplots()
    for extension in sorted({row["extension"] for row, _, _ in drawn}):
        mine = [(x, y) for row, x, y in drawn if row["extension"] == extension]
        axes.scatter([x for x, _ in mine], [y for _, y in mine], s=28, alpha=0.75, label=extension,
                     color=EXTENSION_COLORS.get(extension))
    front_xy = [(drawn[i][1], drawn[i][2]) for i in front]
    axes.step([x for x, _ in front_xy], [y for _, y in front_xy], where="post", color="#222", linewidth=1.2,
              label="Pareto front")
    axes.scatter([x for x, _ in front_xy], [y for _, y in front_xy], s=90, facecolors="none", edgecolors="#d62728",
                 linewidths=1.6, label="on the front")
    axes.set_xscale("log")
    sizes = sorted({x for _, x, _ in drawn})
    axes.xaxis.set_minor_formatter(NullFormatter())
    if len(sizes) <= 8:  # few sizes: mark exactly those
        axes.set_xticks(sizes, [_compact(x) for x in sizes])
    else:
        axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _compact(x)))
    axes.set(xlabel="trainable parameters (log scale)", ylabel=f"{metric.name} ({metric.direction})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    missing = len(points) - len(drawn)
    front_rows = [[_short(drawn[i][0]), drawn[i][0]["task"], drawn[i][0]["extension"], _int(drawn[i][1]),
                   _num(drawn[i][2])] for i in front]
    return "\n".join([
        heading, charts.svg(figure, f"scatter {metric.name}"),
        f"<p class=note>Pareto front ({metric.direction}, fewer parameters better): no other job is at least as "
        f"good on both axes.{f' {missing} succeeded job(s) have no {_e(metric.name)} and are not drawn.' if missing else ''}</p>",
        _html_table(["job", "task", "extension", "trainable", metric.name], front_rows, numeric=(3, 4)),
    ])


# --- heatmaps ------------------------------------------------------------------------------------------


def _heatmaps(rows: Sequence[Mapping[str, Any]], metric: Metric, charts: _Charts) -> str:
    """For each task and extension whose jobs vary exactly two params keys besides the seed: the mean
    metric of each cell."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["extension"]), []).append(row)
    parts = []
    for (task, extension), mine in sorted(groups.items()):
        keys = [key for key in varying_keys(mine) if key != SEED_KEY]
        if len(keys) != 2 or len(parts) >= MAX_HEATMAPS:
            continue
        figure = _heatmap_figure(f"{task} · {extension}: mean {metric.name}", mine, keys, metric)
        if figure is not None:
            parts.append(charts.svg(figure, f"heatmap {task} {extension}"))
    if not parts:
        return ""
    return "<h3>Two-key sweeps</h3>" + "\n".join(parts)


def _heatmap_figure(title: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: Metric) -> Figure | None:
    column_key, row_key = keys
    columns = _sorted_values(row["params"].get(column_key) for row in rows)
    lines = _sorted_values(row["params"].get(row_key) for row in rows)
    grid = [[math.nan] * len(columns) for _ in lines]
    for i, line in enumerate(lines):
        for j, column in enumerate(columns):
            values = [value for row in rows if _key_text(row["params"].get(row_key)) == line
                      and _key_text(row["params"].get(column_key)) == column and (value := metric.value(row)) is not None]
            if values:
                grid[i][j] = statistics.fmean(values)
    if all(math.isnan(value) for line in grid for value in line):
        return None
    figure = Figure(figsize=(1.6 + 1.1 * len(columns), 1.4 + 0.6 * len(lines)))
    axes = figure.subplots()
    image = axes.imshow(grid, cmap="viridis" if metric.maximize else "viridis_r", aspect="auto")
    finite = [value for line in grid for value in line if not math.isnan(value)]
    middle = (min(finite) + max(finite)) / 2
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            text = "–" if math.isnan(value) else f"{value:.4g}"
            dark = not math.isnan(value) and ((value < middle) != metric.maximize)
            axes.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if not dark else "black")
    axes.set_xticks(range(len(columns)), columns)
    axes.set_yticks(range(len(lines)), lines)
    axes.set(xlabel=column_key, ylabel=row_key, title=title)
    figure.colorbar(image, ax=axes, label=metric.name)
    return figure


# --- mean ± std over seeds --------------------------------------------------------------------------------


def _seed_summary(rows: Sequence[Mapping[str, Any]], metric: Metric, charts: _Charts) -> str:
    groups = seed_groups(rows)
    if all(len(group) < 2 for group in groups.values()):
        return ""  # no job repeated with another seed: the scatter already shows each job
    summary = []
    for key, mine in groups.items():
        values = [value for row in mine if (value := metric.value(row)) is not None]
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) >= 2 else None
        summary.append((_group_label(key), len(mine), values, mean, std))
    heading = f"<h3>Mean ± std of {_e(metric.name)} over seeds</h3>"
    table = _html_table(
        ["group (task · extension · params but the seed)", "jobs", "values", "mean", "std", "best"],
        [[label, n, len(values), _num(mean), _num(std),
          _num((max if metric.maximize else min)(values)) if values else ""] for label, n, values, mean, std in summary],
        numeric=range(1, 6))
    valued = [(label, mean, std) for label, _, _, mean, std in summary if mean is not None]
    drawn = valued[:MAX_SEED_GROUPS]
    notes = []
    if len(summary) > len(valued):
        notes.append(f"{len(summary) - len(valued)} group(s) have no {_e(metric.name)}.")
    if len(valued) > len(drawn):
        notes.append(f"{len(valued) - len(drawn)} group(s) not drawn: at most {MAX_SEED_GROUPS}.")
    note = f"<p class=note>{' '.join(notes)}</p>" if notes else ""
    if not drawn:
        return heading + note + table
    figure = Figure(figsize=(7.5, 1.2 + 0.35 * len(drawn)))
    axes = figure.subplots()
    positions = list(range(len(drawn)))
    axes.errorbar([mean for _, mean, _ in drawn], positions, xerr=[std or 0.0 for _, _, std in drawn], fmt="o",
                  color="#1f77b4", ecolor="#555", capsize=4)
    axes.set_yticks(positions, [label for label, _, _ in drawn], fontsize=8)
    axes.invert_yaxis()
    axes.set(xlabel=f"{metric.name} (mean ± sample std)")
    axes.grid(alpha=0.3, axis="x")
    return heading + charts.svg(figure, f"seeds {metric.name}") + note + table


# --- failed and unfinished jobs ------------------------------------------------------------------------


def _not_plotted(rows: Sequence[Mapping[str, Any]], labels: Mapping[str, str]) -> str:
    others = [row for row in rows if row["status"] != "succeeded"]
    if not others:
        return ""
    lines = [[row["id"], labels[row["id"]], row["task"], row["extension"], row["status"],
              (row["error"] or "").splitlines()[0] if row["error"] else ""] for row in others]
    return ("<h3>Jobs not plotted</h3>"
            + _html_table(["id", "job", "task", "extension", "status", "error"], lines, numeric=()))


# --- helpers ------------------------------------------------------------------------------------------


def _labels(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """A short label per job: the params that vary in the batch, else its name, else its id prefix."""
    keys = varying_keys(rows)
    labels = {}
    for row in rows:
        params = row.get("params") or {}
        text = " ".join(f"{key.rsplit('.', 1)[-1]}={_key_text(params.get(key))}" for key in keys if key in params)
        labels[row["id"]] = text or row.get("name") or row["id"][:8]
    return labels


def _job_order(row: Mapping[str, Any]) -> tuple[Any, ...]:
    params = row.get("params") or {}
    values = tuple((key, as_number(value) is None, as_number(value) or 0, _key_text(value))
                   for key, value in sorted(params.items()))
    return row["task"], row["extension"], values, row["id"]


def _short(row: Mapping[str, Any]) -> str:
    return row.get("name") or row["id"][:8]


def _group_label(key: tuple[Any, ...]) -> str:
    task, extension, *params = key
    return " · ".join([task, extension, *(f"{k}={v}" for k, v in params)])


def _key_text(value: Any) -> str:
    return "null" if value is None else str(value)


def _sorted_values(values: Iterable[Any]) -> list[str]:
    distinct = {_key_text(value): value for value in values}
    return sorted(distinct, key=lambda text: (as_number(distinct[text]) is None, as_number(distinct[text]) or 0, text))


def _sort_key(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((value is None, value if value is not None else 0) for value in values)


def _cycle(values: Sequence[str]) -> Iterable[str]:
    while True:
        yield from values


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if hasattr(value, "strftime") else str(value or "")


def _compact(count: float) -> str:
    """A parameter count for an axis: 980, 12.3k, 1.5M, 7B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.3g}{suffix}"
    return f"{count:.3g}"


def _int(value: Any) -> str:
    return "" if value is None else f"{int(value):,}"


def _pct(value: Any) -> str:
    return "" if value is None else f"{value:.3g}%"


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(columns: Sequence[str], lines: Sequence[Sequence[Any]], *, numeric: Iterable[int]) -> str:
    right = set(numeric)
    head = "".join(f"<th>{_e(column)}</th>" for column in columns)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i in right else ''}>{_e(cell)}</td>"
                                    for i, cell in enumerate(line)) + "</tr>" for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h2 small { color: #777; font-weight: normal; font-size: .6em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f4f4f4; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure.chart { margin: .6em 0; }
figure.chart svg { max-width: 100%; height: auto; }
.note { color: #555; font-size: .85em; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
</body>
</html>
"""
