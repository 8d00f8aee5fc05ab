"""The HTML report: rendered in headless Chromium without JavaScript errors, offline, and its numbers
checked against closed forms (the seed toy) and the dense Hessian (a digits MLP)."""

import json
import math
import re
import shutil
import subprocess
import types
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import saddlescope as ss
import saddlescope.report
from saddlescope import errors

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ------------------------------------------------------------------------------ the browser check
def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium)")


@dataclass
class Rendered:
    """What a headless browser made of a page."""

    recorded_errors: str = ""
    error_count: str | None = None
    plots_rendered: str | None = None
    plots: dict[str, bool] = field(default_factory=dict)  # plotly div id -> has drawn its main svg
    verdict: str = ""
    console: list[str] = field(default_factory=list)  # uncaught errors in Chromium's log
    layout: list[str] | None = None  # the page's own measurement of overlapping and clipped labels

    def problems(self) -> list[str]:
        found = []
        if self.recorded_errors.strip() or self.error_count != "0":
            found.append(f"recorded JavaScript errors ({self.error_count}): {self.recorded_errors.strip()}")
        found.extend(f"console: {line}" for line in self.console)
        found.extend(f"plot {name} not drawn" for name, drawn in self.plots.items() if not drawn)
        if self.layout is None:
            found.append("no layout measurement (data-layout-problems missing)")
        else:
            found.extend(f"layout: {problem}" for problem in self.layout)
        return found


class _DomReader(HTMLParser):
    """Reads the dumped DOM: the error box, the plotly plots (divs, counted by depth) and the verdict."""

    def __init__(self) -> None:
        super().__init__()
        self.result = Rendered()
        self.plot_stack: list[tuple[str, int]] = []  # (plot id, div depth where it opened)
        self.depth = 0
        self.capture: str | None = None
        self.capture_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "html":
            self.result.error_count = attrs.get("data-js-errors")
        if tag == "body":
            self.result.plots_rendered = attrs.get("data-plots-rendered")
            if attrs.get("data-layout-problems") is not None:
                self.result.layout = json.loads(attrs["data-layout-problems"])
        if tag == "pre" and attrs.get("id") == "js-errors":
            self.capture = "errors"
        if tag == "div":
            self.depth += 1
            if "js-plotly-plot" in (attrs.get("class") or "").split():
                self.plot_stack.append((attrs.get("id") or f"anonymous-{len(self.result.plots)}", self.depth))
                self.result.plots.setdefault(self.plot_stack[-1][0], False)
            if attrs.get("id") == "verdict":
                self.capture, self.capture_depth = "verdict", self.depth
        if tag == "svg" and "main-svg" in (attrs.get("class") or "").split() and self.plot_stack:
            self.result.plots[self.plot_stack[-1][0]] = True

    def handle_endtag(self, tag):
        if tag == "pre" and self.capture == "errors":
            self.capture = None
        if tag == "div":
            if self.plot_stack and self.plot_stack[-1][1] == self.depth:
                self.plot_stack.pop()
            if self.capture == "verdict" and self.capture_depth == self.depth:
                self.capture = None
            self.depth -= 1

    def handle_data(self, data):
        if self.capture == "errors":
            self.result.recorded_errors += data
        elif self.capture == "verdict":
            self.result.verdict += data


def render(page: Path, tmp_path: Path, width: int = 1280) -> Rendered:
    """Open ``page`` in headless Chromium with no network in a window ``width`` pixels wide, let it run,
    and read the DOM it ends with (the page measures its own labels for overlaps and clipping)."""
    command = [
        browser(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--no-first-run", "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
        f"--window-size={width},1000", "--virtual-time-budget=15000", "--dump-dom", page.resolve().as_uri(),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reader = _DomReader()
    reader.feed(proc.stdout)
    result = reader.result
    result.console = [line for line in proc.stderr.splitlines() if "Uncaught" in line or "net::ERR_" in line]
    assert "</html>" in proc.stdout, "the browser dumped no page"
    return result


def assert_renders(page: Path, tmp_path: Path, expected_plots: set[str], width: int = 1280) -> Rendered:
    result = render(page, tmp_path, width)
    assert result.problems() == []
    assert set(result.plots) == expected_plots
    assert result.plots_rendered == str(len(expected_plots))
    return result


def markup_outside_scripts(text: str) -> str:
    return re.sub(r"(<script[^>]*>).*?(</script>)", r"\1\2", text, flags=re.DOTALL | re.IGNORECASE)


# ------------------------------------------------------------------------------------- fixtures
def seed_toy_loss(w: np.ndarray) -> np.ndarray:
    """(1 - w1 w2)^2, written out here rather than taken from the package."""
    return (1.0 - w[..., 0] * w[..., 1]) ** 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The test machine's 2 cores are shared: two OpenMP threads fighting other jobs run slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    obj = ss.problems.seed_toy()
    cp = ss.analyze(obj, torch.zeros(2, dtype=torch.float64))
    out = tmp_path_factory.mktemp("toy")
    files = saddlescope.report(cp, obj, out=out, command="pytest seed toy")
    return cp, files, json.loads(files.json.read_text())


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    # 2,410 parameters as in the full problem; 300 samples keep the dense Hessians quick.
    problem = ss.problems.digits_mlp((32,), n_samples=300)
    obj = problem.objective
    cp = ss.analyze(obj, exact=True)  # the page against the dense spectrum
    blocks = ss.per_block(obj, cp.theta)
    out = tmp_path_factory.mktemp("mlp")
    files = saddlescope.report(cp, obj, out=out, blocks=blocks)
    truth = torch.linalg.eigvalsh(obj.hessian(cp.theta))
    return obj, cp, files, json.loads(files.json.read_text()), truth


# ----------------------------------------------------------------------------------------- tests
def test_seed_toy_page_renders_a_saddle_with_no_javascript_error(toy, tmp_path):
    _, files, _ = toy
    result = assert_renders(files.html, tmp_path, {"spectrum", "density", "surface", "contour", "escape-slice"})
    assert "saddle" in result.verdict


def test_a_javascript_error_in_the_page_is_caught(toy, tmp_path):
    _, files, _ = toy
    broken = files.html.parent / "broken.html"  # beside the page: it loads the same plotly.min.js
    text = files.html.read_text()
    inject = ("<script>thisFunctionDoesNotExist();</script>"
              "<script>Promise.reject(new Error('deliberate rejection'));</script></body>")
    broken.write_text(text.replace("</body>", inject))
    result = render(broken, tmp_path)
    problems = result.problems()
    assert result.error_count == "2"
    assert "thisFunctionDoesNotExist" in result.recorded_errors
    assert "deliberate rejection" in result.recorded_errors
    assert any("Uncaught" in line for line in result.console)
    assert problems


def test_overlapping_and_clipped_labels_are_caught(toy, tmp_path):
    # The same page with two labels drawn on top of each other and one pushed outside its figure.
    _, files, _ = toy
    text = files.html.read_text()
    start = text.index("<script type='application/json' id=figure-data>") + len("<script type='application/json' id=figure-data>")
    end = text.index("</script>", start)
    figures = json.loads(text[start:end].replace("<\\/", "</"))
    layout = figures[0]["figure"]["layout"]
    layout["annotations"] = [*layout.get("annotations", []),
                             {"text": "first label", "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False},
                             {"text": "second label", "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False},
                             {"text": "far outside", "x": 3.0, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False}]
    broken = files.html.parent / "broken-layout.html"
    broken.write_text(text[:start] + json.dumps(figures).replace("</", "<\\/") + text[end:])
    layout_problems = render(broken, tmp_path).layout
    assert any("first label" in p and "second label" in p for p in layout_problems), layout_problems
    assert any("outside the figure: far outside" in p for p in layout_problems), layout_problems


def test_page_loads_nothing_from_the_network_and_shares_plotly(toy, tmp_path):
    cp, files, _ = toy
    text = files.html.read_text()
    markup = markup_outside_scripts(text)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", markup, flags=re.IGNORECASE)
    # plotly.js is one file beside the page, not inside it: the page is small.
    assert re.findall(r"<script src='([^']+)'>", markup) == ["plotly.min.js"]
    assert (files.html.parent / "plotly.min.js").read_text().count("* plotly.js v") == 1
    assert "* plotly.js v" not in text and len(text) < 200_000
    # Opt in to one self-contained file: the library embedded once, nothing loaded.
    single = saddlescope.report(cp, out=tmp_path / "single", single_file=True)
    one = single.html.read_text()
    assert one.count("* plotly.js v") == 1 and "<script src" not in markup_outside_scripts(one).lower()
    assert not (tmp_path / "single" / "plotly.min.js").exists()
    # The only links are the report's own files, beside the page.
    for target in re.findall(r"""href=['"]([^'"]+)['"]""", markup):
        assert (files.html.parent / target).is_file()


def test_seed_toy_numbers_are_the_closed_form(toy):
    _, files, report = toy
    point = report["critical_point"]
    assert point["kind"] == "saddle"
    assert point["eigenvalues"] == pytest.approx([-2.0, 2.0], abs=1e-12)
    assert (point["n_negative"], point["n_zero"], point["n_positive"]) == (1, 0, 1)
    # The plane is spanned by the eigenvectors (1, 1)/sqrt2 (lambda = -2) and (1, -1)/sqrt2 (lambda = 2).
    plane = report["landscape"]["plane"]
    d1, d2 = (np.array(d) for d in plane["directions"])
    assert abs(d1 @ np.array([1, 1])) / math.sqrt(2) == pytest.approx(1.0, abs=1e-12)
    assert abs(d2 @ np.array([1, -1])) / math.sqrt(2) == pytest.approx(1.0, abs=1e-12)
    a = np.array(plane["alphas"])[None, :, None]
    b = np.array(plane["betas"])[:, None, None]
    expected = seed_toy_loss(a * d1 + b * d2)
    assert np.allclose(np.array(plane["losses"]), expected, rtol=0, atol=1e-12)
    # Along the escape direction w1 w2 = alpha^2 / 2: the loss falls, as (1 - alpha^2/2)^2 - 1.
    line = report["landscape"]["escape"]
    alphas = np.array(line["alphas"])
    assert np.allclose(line["delta_losses"], (1 - alphas**2 / 2) ** 2 - 1, atol=1e-12)
    assert np.allclose(line["quadratic_model"], -(alphas**2), atol=1e-12)  # slope 0, u^T H u = -2
    assert min(line["delta_losses"]) < -0.5
    # SLQ on a 2x2 matrix is exact: its nodes are the eigenvalues.
    assert report["density"]["lambda_min"] == pytest.approx(-2.0, abs=1e-10)
    assert report["density"]["lambda_max"] == pytest.approx(2.0, abs=1e-10)
    hist = report["spectrum"]
    assert sum(hist["linear"]["counts"]) == 2 and sum(hist["symlog"]["counts"]) == 2
    assert hist["symlog"]["counts"][hist["symlog"]["zero_bin"]] == 0
    assert report["escape"]["curvature"] == pytest.approx(-2.0, abs=1e-12)
    assert [abs(c["value"]) for c in report["escape"]["top_components"]] == pytest.approx([2**-0.5] * 2)
    assert report["files"]["pngs"] == {"spectrum": "spectrum.png", "landscape_plane": "landscape_plane.png",
                                       "landscape_escape": "landscape_escape.png"}
    for path in [files.json, *files.pngs.values()]:
        assert path.read_bytes()[:4] in (b"\x89PNG", b"{\n  ")
    assert not list(files.html.parent.glob(".*tmp*"))  # no temporary file left behind


def numbers_in(value, found=None) -> list[float]:
    found = [] if found is None else found
    if isinstance(value, dict):
        for v in value.values():
            numbers_in(v, found)
    elif isinstance(value, list):
        for v in value:
            numbers_in(v, found)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        found.append(float(value))
    return found


def assert_summary_numbers_in_json(page: Path, report: dict) -> None:
    """Every number in the page's summary table is a number of the JSON, to the digits shown."""
    text = page.read_text()
    table = re.search(r"<table id=summary>(.*?)</table>", text, flags=re.DOTALL).group(1)
    shown = re.sub(r"<[^>]+>", " ", table)
    known = np.array(numbers_in(report))
    tokens = re.findall(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])", shown)
    assert tokens
    for token in tokens:
        value = float(token.replace(",", ""))
        mantissa = token.lstrip("+-").split("e")[0].replace(",", "").replace(".", "").lstrip("0") or "0"
        scale = 10.0 ** (math.floor(math.log10(abs(value))) - len(mantissa) + 1) if value else 1e-300
        assert np.any(np.abs(known - value) <= 0.51 * scale), f"{token} on the page is not in the JSON"


def test_every_summary_number_is_in_the_json(toy):
    _, files, report = toy
    assert_summary_numbers_in_json(files.html, report)


def test_digits_mlp_spectrum_matches_the_dense_hessian(mlp, tmp_path):
    obj, cp, files, report, truth = mlp
    point = report["critical_point"]
    assert point["n_params"] == 2410 and point["method"] == "exact"
    assert point["lambda_min"] == pytest.approx(float(truth[0]), rel=1e-8, abs=1e-12)
    assert point["lambda_max"] == pytest.approx(float(truth[-1]), rel=1e-8)
    hist = report["spectrum"]
    assert sum(hist["linear"]["counts"]) == 2410 and sum(hist["symlog"]["counts"]) == 2410
    edges = np.array(hist["linear"]["edges"])
    # The outer edges are the report's own extremes, equal to the truth's up to rounding (checked above).
    counts, _ = np.histogram(np.clip(truth.numpy(), edges[0], edges[-1]), bins=edges)
    assert counts.tolist() == hist["linear"]["counts"]
    tau = hist["zero_threshold"]
    assert hist["symlog"]["counts"][hist["symlog"]["zero_bin"]] == int((truth.abs() <= tau).sum())
    # The block shares of the escape direction add up to |u|^2 = 1, per module of the MLP.
    shares = report["escape"]["block_shares"]
    assert [s["name"] for s in shares] == ["0", "2"] and sum(s["share"] for s in shares) == pytest.approx(1.0)
    names = [c["name"] for c in report["escape"]["top_components"]]
    assert all(re.fullmatch(r"[02]\.(weight\[\d+, \d+\]|bias\[\d+\])", n) for n in names)
    first = report["escape"]["top_components"][0]
    assert abs(first["value"]) == pytest.approx(float(cp.escape_direction.abs().max()))
    # The landscape plane equals the loss evaluated point by point.
    plane = report["landscape"]["plane"]
    d1, d2 = (torch.tensor(d, dtype=torch.float64) for d in plane["directions"])
    for i, j in ((0, 0), (5, 17), (30, 30)):
        point_ij = cp.theta + plane["alphas"][j] * d1 + plane["betas"][i] * d2
        assert plane["losses"][i][j] == pytest.approx(float(obj.loss(point_ij)), rel=1e-10)
    assert report["blocks"]["whole"]["lambda_min"] == pytest.approx(float(truth[0]), rel=1e-5)
    # Two window sizes: no overlapping or clipped label on a wide or a narrow page.
    for width in (1400, 760):
        assert_renders(files.html, tmp_path, {"spectrum", "density", "surface", "contour", "escape-slice",
                                              "escape-blocks", "blocks"}, width)
    assert set(files.pngs) == {"spectrum", "landscape_plane", "landscape_escape", "blocks"}


def test_iterative_path_shows_the_density_and_the_index_error_bars(mlp, tmp_path):
    obj, _, _, _, truth = mlp
    cp = ss.analyze(obj, exact=False)
    files = saddlescope.report(cp, obj, out=tmp_path / "iterative", resolution=11, density_probes=2,
                               density_steps=40)
    report = json.loads(files.json.read_text())
    assert report["critical_point"]["method"] == "lanczos" and report["spectrum"] is None
    # Ritz values lie inside the spectrum (Cauchy interlacing), for the verdict and the density alike.
    for low in (report["critical_point"]["lambda_min"], report["density"]["lambda_min"]):
        assert low >= float(truth[0]) - 1e-8
    for high in (report["critical_point"]["lambda_max"], report["density"]["lambda_max"]):
        assert high <= float(truth[-1]) + 1e-8
    estimate = report["critical_point"]["index_estimate"]
    page = files.html.read_text()
    assert f"{estimate['value']:.4f} &plusmn; {estimate['error']:.3f}" in page
    assert_summary_numbers_in_json(files.html, report)
    expected = {"density", "surface", "contour"}
    if cp.escape_direction is not None:
        expected |= {"escape-slice", "escape-blocks"}
    assert_renders(files.html, tmp_path, expected)


def test_without_an_objective_the_landscape_is_left_out_with_a_note(toy, tmp_path):
    cp, _, _ = toy
    files = saddlescope.report(cp, out=tmp_path)
    report = json.loads(files.json.read_text())
    assert files.figures == ["spectrum"] and report["landscape"] == {"plane": None, "escape": None}
    assert report["density"] is None
    assert any(n.startswith("landscape left out") for n in report["notes"])
    assert "landscape left out" in files.html.read_text()


def test_progress_is_monotone_and_an_interrupted_report_writes_nothing(tmp_path):
    obj = ss.problems.seed_toy()
    cp = ss.analyze(obj)
    seen = []
    saddlescope.report(cp, obj, out=tmp_path / "done", progress=lambda done, total: seen.append((done, total)))
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and seen[-1][0] == seen[-1][1] and len({t for _, t in seen}) == 1

    def interrupt(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        saddlescope.report(cp, obj, out=tmp_path / "stopped", progress=interrupt)
    stopped = tmp_path / "stopped"
    assert not stopped.exists() or list(stopped.iterdir()) == []


def test_bad_input_raises_saddlescope_errors(toy, tmp_path):
    cp, _, _ = toy
    obj = ss.problems.seed_toy()
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("keep me")
    with pytest.raises(errors.InvalidInputError, match="folder"):
        saddlescope.report(cp, obj, out=a_file)
    assert a_file.read_text() == "keep me"
    out = tmp_path / "out"
    with pytest.raises(errors.ThetaError, match="length 2"):
        saddlescope.report(cp, obj, out=out, theta=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(errors.ThetaError, match="length 2"):
        saddlescope.report(cp, out=out, theta=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(errors.InvalidInputError, match="needs the objective"):
        saddlescope.report(cp, out=out, landscape=True)
    with pytest.raises(errors.InvalidInputError, match="needs the objective"):
        saddlescope.report(cp, out=out, density=True)
    with pytest.raises(errors.InvalidInputError, match="parameters"):
        saddlescope.report(cp, ss.problems.digits_mlp((2,), n_samples=10).objective, out=out)
    with pytest.raises(errors.InvalidInputError, match="CriticalPoint"):
        saddlescope.report(cp.to_dict(), obj, out=out)
    with pytest.raises(errors.InvalidInputError, match="BlockReport"):
        saddlescope.report(cp, obj, out=out, blocks={"rows": []})
    with pytest.raises(errors.InvalidInputError, match="resolution"):
        saddlescope.report(cp, obj, out=out, resolution=2)
    with pytest.raises(errors.InvalidInputError, match="span"):
        saddlescope.report(cp, obj, out=out, span=-1.0)
    assert not out.exists()  # nothing is created before the arguments are checked


def test_report_package_is_callable_and_still_a_module():
    assert isinstance(saddlescope.report, types.ModuleType) and callable(saddlescope.report)
    from saddlescope.report import plot_blocks, plots, write_report  # noqa: F401

    assert plots.plot_blocks is plot_blocks
