"""Notebook display (``_repr_html_``): well-formed HTML, the verdict before the numbers, user strings escaped.

The verdicts and numbers checked are known without the package: the seed toy's origin is a saddle
with eigenvalues -2 and 2 (DESIGN.md), and the study summaries are built from records whose counts
are written here.
"""

import dataclasses
from html.parser import HTMLParser

import torch
from torch import nn

import saddlescope as ss
from saddlescope.curvature.blocks import BlockReport, BlockRow
from saddlescope.experiments.min_ratio import MinRatioConfig, MinRatioStudy, summarize
from saddlescope.problems import seed_toy

VOID = {"br", "hr", "img", "meta", "link", "input", "col", "wbr"}
EVIL = "<script>alert('x')</script> & <b>"


class Parsed(HTMLParser):
    """Checks nesting and collects the text in document order."""

    def __init__(self, page):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.text, self.errors = [], [], [], []
        self.in_style = False
        self.feed(page)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed {self.stack}")

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)
        self.in_style = tag == "style"

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()
        self.in_style = False

    def handle_data(self, data):
        if not self.in_style and data.strip():
            self.text.append(data)


def check(page, verdict_words):
    """Well-formed, no script or image from the data, and the verdict is the first text shown."""
    parsed = Parsed(page)
    assert not parsed.errors, parsed.errors
    assert "script" not in parsed.tags and "img" not in parsed.tags
    assert parsed.tags.index("strong") < parsed.tags.index("table")
    first = parsed.text[0]
    assert all(word in first for word in verdict_words), (first, verdict_words)
    return parsed


def test_critical_point_shows_the_verdict_first_with_the_closed_form_numbers():
    point = ss.analyze(seed_toy(), torch.zeros(2, dtype=torch.float64))
    parsed = check(point._repr_html_(), ["saddle"])
    text = " ".join(parsed.text)
    assert "-2" in text and " 2" in text  # lambda_min, lambda_max of [[0, -2], [-2, 0]]
    assert "1 negative / 0 zero / 1 positive" in text


def test_critical_point_escapes_its_strings():
    point = ss.analyze(seed_toy(), torch.zeros(2, dtype=torch.float64))
    evil = dataclasses.replace(point, reason=EVIL, notes=[EVIL], method=EVIL)
    parsed = check(evil._repr_html_(), ["saddle"])
    assert EVIL in parsed.text[1]  # the reason follows the verdict, as text
    assert "".join(parsed.text).count("<script>") == 3  # reason, method and note: shown as text


def test_not_critical_with_negative_curvature_reads_as_crawling_past_a_saddle():
    point = ss.analyze(seed_toy(), torch.tensor([0.1, 0.0], dtype=torch.float64))
    assert point.kind == "not_critical"
    check(point._repr_html_(), ["not_critical", "crawling past a saddle"])


def block_row(name, lambda_min, lambda_max, delta=1e-8):
    return BlockRow(name=name, n_params=3, lambda_min=lambda_min, lambda_max=lambda_max, trace=lambda_min + lambda_max,
                    trace_low=0.0, trace_high=0.0, index=0.0, index_error=0.0, delta=delta, method="exact",
                    converged=True, hvp_count=3)


def test_block_report_leads_with_where_negative_curvature_lives_and_escapes_names():
    rows = [block_row(EVIL, -1.0, 3.0), block_row("fc2", 0.5, 7.0), block_row("fc3", -1e-9, 1.0)]
    report = BlockReport(rows=rows, whole=block_row("whole", -2.0, 8.0), by="module", seconds=0.1, hvp_count=9)
    parsed = check(report._repr_html_(), ["negative curvature in 1 of 3 blocks"])
    text = "".join(parsed.text)
    assert EVIL in text and "sharpest block: fc2" in text  # fc3's -1e-9 is inside its zero band


def test_a_real_block_report_renders():
    x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    objective = ss.Objective.from_model(model, nn.MSELoss(), (x, x[:, :1]))
    report = ss.per_block(objective)
    check(report._repr_html_(), ["blocks"])


def test_min_ratio_study_counts_minima_first():
    records = [
        {"label": "critical", "kind": "saddle", "min_ratio": 0.9, "index": 0.1, "loss": 1.0, "seconds": {"total": 1}},
        {"label": "critical", "kind": "minimum", "min_ratio": 1.0, "index": 0.0, "loss": 0.5, "seconds": {"total": 1}},
        {"label": "critical", "kind": "saddle", "min_ratio": 0.8, "index": 0.2, "loss": 1.5, "seconds": {"total": 1}},
        {"label": "not_converged", "seconds": {"total": 1}},
    ]
    study = MinRatioStudy(out="x", n_networks=4, seed=0, config=MinRatioConfig(), records=records,
                          summary=summarize(records))
    parsed = check(study._repr_html_(), ["1 of 3 critical points are minima"])
    assert "0.900" in "".join(parsed.text)  # the largest min ratio at a saddle


def test_prevalence_study_and_race_render_and_escape(tmp_path):
    from saddlescope.experiments import PrevalenceConfig, prevalence_study, race

    config = PrevalenceConfig(families=("polynomial",), dims=(2,), instances=1, starts=3, kicks=1, theory_samples=200)
    study = prevalence_study(out=tmp_path, seed=2, config=config, workers=0, progress=False)
    study.rows = [dataclasses.replace(r, family=EVIL) for r in study.rows]
    parsed = check(study._repr_html_(), ["minima among the distinct critical points"])
    assert EVIL in "".join(parsed.text)

    result = race(["seed-toy", "saddle-quadratic"], ["gd", "perturbed-gd"], seeds=2, quick=True)
    fastest = {s.problem: s.best for s in result.summaries if s.optimizer == "perturbed-gd"}
    result.summaries = [dataclasses.replace(s, problem=EVIL if s.problem == "seed-toy" else s.problem)
                        for s in result.summaries]
    parsed = check(result._repr_html_(), ["fastest escape"])
    text = "".join(parsed.text)
    assert EVIL in text
    # GD never leaves an exact saddle (README findings): the perturbed method is the fastest.
    assert f"saddle-quadratic: perturbed-gd ({fastest['saddle-quadratic'].steps_median} steps" in text


def test_monitor_and_its_events_render():
    from saddlescope.monitor import SaddleMonitor

    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    monitor = SaddleMonitor(model, nn.MSELoss(), (x, x[:, :1]), action="none", verbose=False)
    assert "no events" in Parsed(monitor._repr_html_()).text[0]
    monitor.step(1.0)
    monitor.step(float("inf"))
    check(monitor._repr_html_(), ["1 events in 2 steps", "divergence"])
    event = monitor.events[0]
    event.message = EVIL
    parsed = Parsed(event._repr_html_())
    assert not parsed.errors and "script" not in parsed.tags and EVIL in "".join(parsed.text)
