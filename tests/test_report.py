"""`graftq report`: the Pareto front on hand cases, the page's sections, and the page in a real
headless Chromium (DOM with drawn charts, no console messages, a screenshot that is not blank)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import textwrap
from html.parser import HTMLParser

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from db.session import clear_cache, get_database
from db.tables import jobs
from jobs.cli import cli
from jobs.report import Metric, metric_direction, pareto_front, seed_groups, varying_keys
from tests.conftest import ROOT, graftq_argv

pytest.importorskip("matplotlib")


# --- pure parts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("points", "maximize", "front"), [
    ([], False, []),
    ([(10, 1.0)], False, [0]),
    # (20, 2.0) is beaten by (10, 1.0): fewer parameters and a lower loss.
    ([(20, 2.0), (10, 1.0), (30, 0.5)], False, [1, 2]),
    # Equal size: only the better one; a larger job with an equal loss is not on the front.
    ([(10, 2.0), (10, 1.5), (40, 1.5), (50, 0.1)], False, [1, 3]),
    # Identical points: the first only.
    ([(5, 1.0), (5, 1.0)], False, [0]),
    # Higher is better: the same points, read the other way.
    ([(20, 2.0), (10, 1.0), (30, 0.5)], True, [1, 0]),
    ([(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.95)], True, [0, 1, 3]),
])
def test_pareto_front_on_hand_cases(points, maximize, front):
    assert pareto_front(points, maximize=maximize) == front


def test_metric_values_directions_and_seed_groups():
    row = {"eval_loss": 1.5, "train_seconds": None, "metrics": {"exact_match": 0.25, "bleu": float("nan")}}
    assert Metric("eval_loss", maximize=False).value(row) == 1.5
    assert Metric("exact_match", maximize=True).value(row) == 0.25
    assert Metric("metric.exact_match", maximize=True).value(row) == 0.25
    assert Metric("bleu", maximize=True).value(row) is None  # not finite: not plotted
    assert Metric("train_seconds", maximize=False).value(row) is None
    assert Metric("f1", maximize=True).value({"metrics": None}) is None
    assert [metric_direction(n) for n in ("eval_loss", "metric.accuracy", "rouge_l", "train_seconds", "vibes")] == [
        False, True, True, False, None]
    rows = [{"task": "t", "extension": "lora", "params": {"lora.r": r, "train.seed": seed}}
            for r in (4, 8) for seed in (0, 1)] + [{"task": "t", "extension": "layer", "params": {}}]
    assert varying_keys(rows) == ["lora.r", "train.seed"]
    groups = seed_groups(rows)
    assert [len(group) for group in groups.values()] == [2, 2, 1]
    assert list(groups)[0] == ("t", "lora", ("lora.r", "4"))


# --- a database written through the db functions ------------------------------------------------------


def _record(sqlite_url: str) -> dict[str, list[str]]:
    """A batch `grid` (LoRA r x learning rate x seed, a layer and a hybrid job per seed, one failed
    job, one job without eval loss) and an empty batch `nothing`; some jobs have task metrics."""
    from db.claims import claim_job, fail_job, finish_job
    from db.submission import create_batch

    database = get_database(sqlite_url)
    specs = []
    for r in (4, 8):
        for lr in (0.001, 0.003):
            for seed in (0, 1):
                specs.append(("lora", {"lora.r": r, "train.learning_rate": lr, "train.seed": seed}))
    for seed in (0, 1):
        specs += [("layer", {"train.seed": seed}), ("hybrid", {"train.seed": seed})]
    specs.append(("lora", {"lora.r": 16, "train.learning_rate": 0.001, "train.seed": 0}))  # fails
    rows = [{"task": "reverse", "kind": "train", "extension": extension, "base_model": "random:t5-tiny",
             "queue": None, "spec": {}, "params": params} for extension, params in specs]
    with database.begin() as connection:
        batch_id, ids = create_batch(connection, "grid", rows)
        create_batch(connection, "nothing", [])
        for index, (job_id, (extension, params)) in enumerate(zip(ids[:-1], specs[:-1])):
            token = claim_job(connection, job_id, "w", 60).token
            lora = {"lora": 1536 * params.get("lora.r", 8), "layer": 0, "hybrid": 12288}[extension]
            layer = {"lora": 0, "layer": 40000, "hybrid": 40000}[extension]
            trainable = lora + layer
            final = 5.0 - 0.3 * index / len(ids) - (0.4 if params.get("train.learning_rate") == 0.003 else 0)
            curve = [(step, "train", final + 1.0 - step / 10) for step in range(11)]
            no_eval = index == 3
            if not no_eval:
                curve += [(0, "eval", final + 1.2), (10, "eval", final)]
            finish_job(connection, job_id, token, stats={
                "base_params": 181440, "trainable_params": trainable, "lora_params": lora, "layer_params": layer,
                "trainable_pct": 100 * trainable / 181440},
                metrics={"train_loss": final, "eval_loss": None if no_eval else final, "steps": 10},
                device="cpu", dtype="float32", versions={}, job_dir=f"/art/{job_id}", loss_curve=curve)
            if extension == "lora":
                connection.execute(update(jobs).where(jobs.c.id == job_id).values(
                    metrics={"exact_match": round(0.1 + index / 20, 3)}))
        token = claim_job(connection, ids[-1], "w", 60).token
        fail_job(connection, ids[-1], token, "ConfigError: r=16 is too large\nmore", "Traceback...")
    return {"grid": ids}


@pytest.fixture
def recorded(sqlite_url):
    ids = _record(sqlite_url)
    yield sqlite_url, ids
    clear_cache()


def _report(sqlite_url: str, *args: str):
    return CliRunner().invoke(cli, ["--database-url", sqlite_url, "report", *args], catch_exceptions=False)


def test_the_report_has_every_section_and_lists_what_it_does_not_plot(recorded, tmp_path):
    sqlite_url, ids = recorded
    out = tmp_path / "sub" / "report.html"
    result = _report(sqlite_url, "--all", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (2 batch(es), 13 job(s))" in result.output
    page = out.read_text()
    grid, empty = page.split("Batch nothing")
    assert "This batch has no matching jobs" in empty
    for heading in ("Parameter efficiency", "Loss curves", "eval_loss versus trainable parameters",
                    "Two-key sweeps", "Mean ± std of eval_loss over seeds", "Jobs not plotted"):
        assert f"<h3>{heading}" in grid, heading
    # The hybrid trains 12288 (LoRA part, as the r=8 LoRA jobs) + 40000 (as the layer jobs).
    assert "4.26×" in grid and "1.31×" in grid
    assert "ConfigError: r=16 is too large" in grid and "more" not in grid.split("Jobs not plotted")[1]
    # One curve chart (reverse · layer and · hybrid and · lora), a scatter, one heatmap, the seed chart.
    charts = re.findall(r'data-chart="([^"]+)"', page)
    assert charts == ["curves reverse hybrid", "curves reverse layer", "curves reverse lora",
                      "scatter eval_loss", "heatmap reverse lora", "seeds eval_loss"]
    assert "1 succeeded job(s) have no eval_loss" in grid
    # Same database, same bytes (ids in the SVG are salted per chart, not random).
    again = tmp_path / "again.html"
    _report(sqlite_url, "--all", "--out", str(again))
    assert again.read_text() == page


def test_report_options_pick_batches_metric_and_direction(recorded, tmp_path):
    sqlite_url, ids = recorded
    out = tmp_path / "r.html"
    newest = _report(sqlite_url, "--out", str(out))
    assert "(1 batch(es), 0 job(s))" in newest.output  # the default: the newest batch, here the empty one
    by_name = _report(sqlite_url, "grid", "--metric", "exact_match", "--where", "extension=lora",
                      "--status", "succeeded", "--out", str(out))
    assert "(1 batch(es), 8 job(s))" in by_name.output
    page = out.read_text()
    assert "exact_match</b> (higher is better)" in page and "Jobs not plotted" not in page
    front = page.split("exact_match versus trainable parameters")[1].split("<h3>")[0]
    assert front.count("<tr>") == 1 + 2  # the header, the best r=4 job and the best r=8 job
    unknown = CliRunner().invoke(cli, ["--database-url", sqlite_url, "report", "grid", "--metric", "vibes"])
    assert unknown.exit_code == 2 and "--maximize or --minimize" in unknown.output
    assert _report(sqlite_url, "grid", "--metric", "vibes", "--maximize", "--out", str(out)).exit_code == 0
    missing = CliRunner().invoke(cli, ["--database-url", sqlite_url, "report", "nosuchbatch"])
    assert missing.exit_code == 2 and "no batch with id or name 'nosuchbatch'" in missing.output
    both = CliRunner().invoke(cli, ["--database-url", sqlite_url, "report", "grid", "--all"])
    assert both.exit_code == 2 and "not both" in both.output
    clear_cache()
    nothing = _report(f"sqlite:///{tmp_path / 'empty.db'}", "--out", str(out))
    assert "(0 batch(es), 0 job(s))" in nothing.output and "No batch matched" in out.read_text()


def test_report_without_matplotlib_says_how_to_install_it(recorded, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jobs.report", None)  # what an install without the extra sees
    result = CliRunner().invoke(cli, ["--database-url", recorded[0], "report", "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "pip install 'graftq[report]'" in result.output
    assert not (tmp_path / "r.html").exists()


@pytest.mark.postgres
def test_report_reads_postgresql(postgres_database, tmp_path):
    from db.session import create_database_engine, upgrade_to_head

    engine = create_database_engine(postgres_database)
    upgrade_to_head(postgres_database, engine)
    engine.dispose()
    _record(postgres_database)
    out = tmp_path / "pg.html"
    try:
        assert _report(postgres_database, "grid", "--out", str(out)).exit_code == 0
    finally:
        clear_cache()
    assert len(re.findall(r'data-chart="', out.read_text())) == 6


# --- in a real browser ---------------------------------------------------------------------------------


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class _Tree(HTMLParser):
    """The dumped DOM as nested (tag, attributes, children) lists."""

    def __init__(self) -> None:
        super().__init__()
        self.root: list = ["root", {}, []]
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = [tag, dict(attrs), []]
        self.stack[-1][2].append(node)
        if tag not in ("meta", "br", "img", "input", "link"):
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1][2].append([tag, dict(attrs), []])

    def handle_endtag(self, tag):
        for depth in range(len(self.stack) - 1, 0, -1):
            if self.stack[depth][0] == tag:
                del self.stack[depth:]
                return


def _walk(node):
    yield node
    for child in node[2]:
        yield from _walk(child)


MARK_GROUP = re.compile(r"^(line2d|PathCollection|LineCollection|QuadMesh|image)_\d+$")


def _marks(figure) -> int:
    """Drawing elements of an axes' data groups (lines, markers, images): neither ticks nor spines."""
    count = 0
    for axes in (n for n in _walk(figure) if n[0] == "g" and n[1].get("id", "").startswith("axes_")):
        for group in axes[2]:
            # Data groups have ids such as line2d_3; an image (a heatmap) sits in an unnamed clip group.
            if group[0] == "g" and MARK_GROUP.match(group[1].get("id", "image_0") or "image_0"):
                count += sum(1 for n in _walk(group) if n[0] in ("path", "use", "image", "line", "rect", "polyline"))
    return count


def test_the_report_renders_in_headless_chromium(recorded, tmp_path):
    from PIL import Image, ImageStat

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (make test installs the distribution's chromium package)")
    sqlite_url, _ = recorded
    out = tmp_path / "report.html"
    assert _report(sqlite_url, "--all", "--out", str(out)).exit_code == 0
    page = out.read_text()
    # Nothing to fetch: the only URLs are SVG namespace names, and there is no script.
    assert len(re.findall(r"https?://", page)) == len(re.findall(r'xmlns(?::\w+)?="https?://', page))
    assert "<script" not in page and "<link" not in page and "@import" not in page
    flags = ["--headless=new", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    url = out.as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60)
    shot = tmp_path / "shot.png"
    screenshot = subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2000",
                                 "--hide-scrollbars", url], capture_output=True, text=True, timeout=60)
    for run in (dom, screenshot):
        assert run.returncode == 0, run.stderr[-2000:]
        console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
        assert console == [], console
    tree = _Tree()
    tree.feed(dom.stdout)
    figures = [n for n in _walk(tree.root) if n[0] == "figure"]
    assert len(figures) == 6
    for figure in figures:
        svgs = [n for n in _walk(figure) if n[0] == "svg"]
        assert len(svgs) == 1, figure[1]
        heatmap = figure[1]["data-chart"].startswith("heatmap")
        assert _marks(figure) >= (1 if heatmap else 3), figure[1]["data-chart"]
    heatmap = next(f for f in figures if f[1]["data-chart"] == "heatmap reverse lora")
    texts = [n for n in _walk(heatmap) if n[0] == "text"]
    assert len(texts) >= 4 + 4  # a value per cell (2 x 2) besides the axes' labels
    lora_curves = next(f for f in figures if f[1]["data-chart"] == "curves reverse lora")
    assert _marks(lora_curves) >= 8 + 7  # eight jobs' train lines, seven eval lines (one job has none)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    variance = ImageStat.Stat(image).var
    colours = image.getcolors(maxcolors=1 << 20)
    assert min(variance) > 100 and len(colours) > 50, (variance, len(colours))


# --- a real batch ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_of_a_batch_run_for_real(tmp_path, graftq_env, dataset):
    batch = tmp_path / "batch.yaml"
    batch.write_text(textwrap.dedent(f"""\
        batch: real
        base_model: random:t5-tiny
        defaults:
          lora: {{r: 4, target_modules: [q, v]}}
          train: {{dataset: {dataset}, max_steps: 3, batch_size: 2, eval_fraction: 0.25, max_length: 16}}
        jobs:
          - {{task: reverse, extension: lora}}
          - {{task: reverse, extension: hybrid}}
        """))
    run = subprocess.run(graftq_argv("run", str(batch)), cwd=ROOT, env=graftq_env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = tmp_path / "report.html"
    report = subprocess.run(graftq_argv("report", "real", "--out", str(out)), cwd=ROOT, env=graftq_env,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    page = out.read_text()
    assert re.findall(r'data-chart="([^"]+)"', page) == ["curves reverse hybrid", "curves reverse lora",
                                                         "scatter eval_loss"]
    # Both jobs record real statistics: the hybrid trains more than the LoRA job and the table says by what.
    ratio = re.search(r"<td class=n>(\d+\.\d\d)×</td>", page)
    assert ratio and float(ratio.group(1)) > 1 and not math.isnan(float(ratio.group(1)))
