"""SaddleMonitor and StallDetector against planted truth.

Synthetic loss curves with a known plateau, divergence or oscillation drive the detector alone; a
tanh MLP initialised at exactly zero (a saddle whose Hessian is known in closed form) drives the whole
monitor, checked against an eigendecomposition of the Hessian built independently with
``torch.autograd.functional.hessian``.
"""

import itertools
import json
import logging
import math
import sys
import types

import pytest
import torch
from torch import nn

from saddlescope.errors import InvalidInputError
from saddlescope.monitor import DetectorConfig, MonitorEvent, SaddleMonitor, StallDetector

WINDOW = DetectorConfig().window


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: a second intra-op thread only adds contention (10-30x slower steps
    on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(detector, losses, grads=None):
    """Feed a loss sequence (and optional gradient norms); return the detections."""
    grads = grads if grads is not None else [None] * len(losses)
    found = [detector.update(loss, grad) for loss, grad in zip(losses, grads)]
    return [d for d in found if d is not None]


# ------------------------------------------------------------------------------ synthetic curves
def plateau_curve(descent=200, flat=600, seed=0):
    """Linear descent from 2 to 1 over ``descent`` steps, then flat at 1 (tiny noise)."""
    gen = torch.Generator().manual_seed(seed)
    noise = 1e-6 * torch.randn(flat, generator=gen, dtype=torch.float64)
    losses = [2.0 - t / descent for t in range(1, descent + 1)] + [1.0 + float(e) for e in noise]
    return losses


def ema_settling_step(descent, config):
    """When the smoothed loss of :func:`plateau_curve` turns flat, from the EMA's algebra: on the
    ramp of slope r it lags by e = r beta / (1 - beta); on the plateau that excess decays as
    beta^k, and the window's change e beta^k (1 - beta^W) falls below flat_tol after k steps."""
    beta, window = config.beta, config.window
    excess = (1.0 / descent) * beta / (1 - beta)
    k = math.log(config.flat_tol / (excess * (1 - beta**window))) / math.log(beta)
    return descent + window + math.ceil(k)


@pytest.mark.parametrize("beta", [0.9, 0.98])
@pytest.mark.parametrize("with_grads", [True, False])
def test_planted_plateau_is_a_stall_inside_the_plateau(with_grads, beta):
    descent = 200
    config = DetectorConfig(beta=beta)
    losses = plateau_curve(descent)
    grads = [1.0] * descent + [1e-4] * (len(losses) - descent) if with_grads else None
    detections = run(StallDetector(config), losses, grads)
    assert detections, "the plateau was not flagged"
    first = detections[0]
    assert first.kind == "stall"
    # Inside the plateau, not before it, and as soon as the smoothed loss has settled.
    assert descent < first.step <= ema_settling_step(descent, config) + 2, first.step
    assert abs(first.details["relative_change"]) <= config.flat_tol
    assert first.details["grad_checked"] is with_grads
    assert {d.kind for d in detections} == {"stall"}


def test_flat_loss_with_a_large_gradient_is_not_a_stall():
    losses = plateau_curve()
    assert run(StallDetector(), losses, [1.0] * len(losses)) == []


def test_lazy_gradient_is_evaluated_only_when_needed():
    calls = []

    def grad_norm():
        calls.append(detector.step)
        return 1e-4 if detector.step > 200 else 1.0

    detector = StallDetector()
    losses = plateau_curve()
    detections = run(detector, losses, [grad_norm] * len(losses))
    assert detections and detections[0].kind == "stall"
    # The first step sets the scale; afterwards only flat steps ask for the gradient.
    assert calls[0] == 1 and all(step > 200 for step in calls[1:])
    # ...and not while a stall is cooling down: one call per event.
    assert len(calls) == 1 + len(detections)


def test_planted_divergence_is_flagged_and_blames_the_learning_rate():
    start = 100
    losses = [1.0 / math.sqrt(t) for t in range(1, start + 1)]
    losses += [losses[-1] * 1.05**k for k in range(1, 200)]  # geometric growth
    detections = run(StallDetector(), losses)
    assert detections and detections[0].kind == "divergence"
    assert start < detections[0].step <= start + 2 * WINDOW
    assert "learning rate" in detections[0].message


def test_non_finite_loss_is_divergence_at_once_and_spares_the_average():
    detector = StallDetector()
    detections = run(detector, [1.0, 0.9, float("nan"), 0.8])
    assert [(d.kind, d.step) for d in detections] == [("divergence", 3)]
    assert "learning rate" in detections[0].message
    assert math.isfinite(detector.smoothed_loss)
    assert detector.history.to_dict()["loss"][2] is None  # JSON-ready


def test_one_spike_is_not_divergence():
    losses = [1.0 / t for t in range(1, 400)]
    losses[200] *= 10
    assert run(StallDetector(), losses) == []


def test_alternating_loss_is_oscillation():
    losses = [2.0 - t / 400 + 0.1 * (-1) ** t for t in range(1, 300)]
    detections = run(StallDetector(), losses)
    assert detections and {d.kind for d in detections} == {"oscillation"}
    assert detections[0].step == WINDOW + 1  # as soon as a full window is seen
    assert detections[0].details["sign_change_fraction"] == 1.0
    assert "learning rate" in detections[0].message


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_noisy_decrease_gives_no_event(seed):
    gen = torch.Generator().manual_seed(seed)
    steps = 3000
    noise = torch.randn(2, steps, generator=gen, dtype=torch.float64)
    losses = [(1.0 / t) * (1 + 0.03 * float(noise[0, t - 1])) for t in range(1, steps + 1)]
    grads = [(1.0 / t) * (1 + 0.03 * float(noise[1, t - 1])) for t in range(1, steps + 1)]
    assert run(StallDetector(), losses, grads) == []


def test_cooldown_spaces_repeated_events_by_the_window():
    losses = [1.0] * 400
    detections = run(StallDetector(DetectorConfig(window=20)), losses)
    steps = [d.step for d in detections]
    assert steps[0] == 21 and all(b - a == 20 for a, b in zip(steps, steps[1:]))


# ------------------------------------------------------------------------------ a real saddle
def regression_data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:] + 0.3
    return x, y


def zero_tanh_mlp(hidden=8):
    """A 2-layer tanh net with every weight and bias exactly zero: SGD can only fit the output
    bias, after which every gradient is exactly zero (a saddle it never leaves)."""
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def train(model, data, steps, monitor=None, lr=0.1):
    x, y = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.step(loss)
    with torch.no_grad():
        return float(loss_fn(model(x), y))


def reference_hessian(model, data, theta):
    """The Hessian at ``theta`` the slow, obvious way: autograd on a flat-parameter function."""
    x, y = data
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [s.numel() for s in shapes]

    def loss_of(flat):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, theta.detach().clone())


def test_zero_initialised_tanh_mlp_stalls_and_the_monitor_escapes_its_saddle():
    data = regression_data()
    x, y = data
    steps = 400
    stuck = train(zero_tanh_mlp(), data, steps)
    assert stuck == pytest.approx(float(y.var(unbiased=False)), rel=1e-10)  # it never leaves

    model = zero_tanh_mlp()
    monitor = SaddleMonitor(model, nn.MSELoss(), data, action="escape")
    final = train(model, data, steps, monitor)

    stalls = [e for e in monitor.events if e.kind == "stall"]
    assert stalls and stalls[0].verdict == "saddle" and stalls[0].action == "escaped"
    event = stalls[0]
    # The verdict's spectrum against an independent eigendecomposition: at the saddle the
    # output-weight/input-weight cross terms are -2 E[(y - mean y) x] per hidden unit, so
    # lambda_min = -2 ||E[(y - mean y) x]||.
    eigenvalues = torch.linalg.eigvalsh(reference_hessian(model, data, event.critical_point.theta))
    assert float(eigenvalues[0]) < -0.1
    assert event.critical_point.lambda_min == pytest.approx(float(eigenvalues[0]), abs=1e-8)
    planted = -2 * float(((y - y.mean()) * x).mean(0).norm())
    assert float(eigenvalues[0]) == pytest.approx(planted, abs=1e-6)
    assert event.loss_after < event.analysis["loss"]
    assert final < 0.6 * stuck


def test_report_action_analyses_without_moving_the_parameters():
    data = regression_data()
    model = zero_tanh_mlp()
    monitor = SaddleMonitor(model, nn.MSELoss(), data, action="report")
    train(model, data, 160, monitor)
    event = monitor.events[0]
    assert (event.kind, event.verdict, event.action, event.loss_after) == ("stall", "saddle", "reported", None)
    with torch.no_grad():
        assert all(float(p.abs().max()) == 0 for p in model[0].parameters())  # still exactly at zero


def test_no_escape_at_a_minimum():
    data = regression_data()
    model = nn.Linear(2, 1).double()  # least squares: one minimum, no negative curvature
    monitor = SaddleMonitor(model, nn.MSELoss(), data, action="escape")
    train(model, data, 400, monitor, lr=0.3)
    stalls = [e for e in monitor.events if e.kind == "stall"]
    assert stalls and stalls[0].verdict == "minimum"
    assert stalls[0].action == "no_escape" and stalls[0].loss_after is None
    # The Hessian of mean squared error of a linear model is 2 E[z z^T] with z = (x, 1).
    z = torch.cat([data[0], torch.ones(len(data[0]), 1, dtype=torch.float64)], dim=1)
    planted = float(torch.linalg.eigvalsh(2 * z.T @ z / len(z))[0])
    assert stalls[0].analysis["lambda_min"] == pytest.approx(planted, rel=1e-9)


def test_gradient_from_data_when_no_parameter_has_grad():
    data = regression_data()
    model = zero_tanh_mlp()
    monitor = SaddleMonitor(model, nn.MSELoss(), data, action="none")
    monitor.step(1.0)  # no backward was run: the monitor computes the full gradient itself
    expected = float(monitor.objective().grad(monitor.objective().theta0).norm())
    assert monitor.history.grad_norm[0] == pytest.approx(expected, rel=1e-12)


def test_event_and_monitor_are_json_serialisable_and_reported():
    data = regression_data()
    model = zero_tanh_mlp()
    seen = []
    monitor = SaddleMonitor(model, nn.MSELoss(), data, action="escape", callback=seen.append)
    train(model, data, 160, monitor)
    assert seen == monitor.events and isinstance(seen[0], MonitorEvent)
    text = json.dumps(monitor.events[0].to_dict(), allow_nan=False)
    assert json.loads(text)["verdict"] == "saddle"
    whole = json.loads(json.dumps(monitor.to_dict(), allow_nan=False))
    assert len(whole["history"]["loss"]) == 160 and whole["config"]["window"] == WINDOW


def test_events_are_logged_and_printed_when_verbose(caplog, capsys):
    monitor = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), regression_data(), action="none", verbose=True)
    with caplog.at_level(logging.INFO, logger="saddlescope.monitor"):
        monitor.step(torch.tensor(1.0))
        monitor.step(torch.tensor(float("inf")))
    assert [(e.kind, e.action, e.verdict) for e in monitor.events] == [("divergence", "none", None)]
    assert "diverged" in caplog.text
    assert capsys.readouterr().out.count("\n") == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"action": "fix"},
        {"window": 1},
        {"window": 10.5},
        {"beta": 1.0},
        {"flat_tol": -1.0},
        {"rise_tol": float("nan")},
        {"osc_fraction": 0.2},
        {"cooldown": -1},
        {"analyze_kwargs": {"bogus": 1}},
        {"analyze_kwargs": {"theta": None}},
        {"escape_kwargs": {"step": 1.0}},
        {"objective_kwargs": [("dtype", torch.float64)]},
        {"callback": "print"},
    ],
)
def test_bad_arguments_raise_invalid_input(kwargs):
    with pytest.raises(InvalidInputError):
        SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), regression_data(), **kwargs)


def test_bad_model_data_and_losses_raise_invalid_input():
    with pytest.raises(InvalidInputError, match="nn.Module"):
        SaddleMonitor(lambda x: x, nn.MSELoss(), regression_data())
    with pytest.raises(InvalidInputError):
        SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), (torch.zeros(3, 5), torch.zeros(3, 1)))
    monitor = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), regression_data())
    with pytest.raises(InvalidInputError, match="scalar"):
        monitor.step(torch.ones(3))
    with pytest.raises(InvalidInputError):
        monitor.step("0.5")
    with pytest.raises(InvalidInputError):
        StallDetector().update(1.0, -1.0)


# ------------------------------------------------------------------------------ lightning
def test_lightning_callback_without_lightning_says_what_to_install(monkeypatch):
    # Hide whichever Lightning is installed: a None entry in sys.modules makes its import fail.
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monitor = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), regression_data())
    with pytest.raises(ImportError, match="pip install lightning"):
        monitor.lightning_callback()


def test_lightning_callback_feeds_the_loss_to_the_monitor(monkeypatch):
    # A stand-in for lightning.pytorch: only the Callback base class is used.
    package = types.ModuleType("lightning")
    module = types.ModuleType("lightning.pytorch")
    module.Callback = type("Callback", (), {})
    package.pytorch = module
    monkeypatch.setitem(sys.modules, "lightning", package)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", module)
    monitor = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), regression_data(), action="none")
    callback = monitor.lightning_callback()
    assert isinstance(callback, module.Callback)
    callback.on_train_batch_end(None, None, {"loss": torch.tensor(0.5)}, None, 0)
    callback.on_train_batch_end(None, None, torch.tensor(0.25), None, 1)
    callback.on_train_batch_end(None, None, None, None, 2)  # a skipped batch
    assert monitor.history.loss == [0.5, 0.25]


def test_lightning_trainer_runs_the_callback():
    pl = pytest.importorskip("lightning.pytorch")
    x, y = regression_data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = zero_tanh_mlp()

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    monitor = SaddleMonitor(module, nn.MSELoss(), (x, y), action="escape")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    trainer = pl.Trainer(max_epochs=200, callbacks=[monitor.lightning_callback()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert len(monitor.history) == 200
    assert any(e.action == "escaped" for e in monitor.events)


# ------------------------------------------------------------------------------ what it costs
def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def loss_at(model, data, theta):
    """The full-data MSE at a flat parameter vector, computed here without the package."""
    x, y = data
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    params = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, [s.numel() for s in shapes]), shapes)}
    with torch.no_grad():
        return float(nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y))


def test_persistent_saddle_is_reanalysed_with_exponential_backoff():
    # Without a time budget the spacing alone decides: a verdict that repeats at an unchanged loss
    # doubles the gap to the next look; with backoff=1 the old rhythm (every window) comes back.
    data = regression_data()
    spaced = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), data, action="report", time_fraction=None)
    train(spaced.model, data, 1000, spaced)
    steps = [e.step for e in spaced.events]
    assert {e.verdict for e in spaced.events} == {"saddle"} and {e.action for e in spaced.events} == {"reported"}
    assert [b - a for a, b in itertools.pairwise(steps)] == [WINDOW * 2**i for i in range(len(steps) - 1)]
    assert len(steps) == 5 and spaced.spending.analyses == 5  # 150, 200, 300, 500, 900
    assert spaced.spending.quiet == (1000 - steps[0]) // WINDOW - (len(steps) - 1)
    assert spaced.events[-1].budget["next_step"] == steps[-1] + WINDOW * 2 ** len(steps[1:])

    every = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), data, action="report", time_fraction=None, backoff=1.0)
    train(every.model, data, 1000, every)
    assert [e.step for e in every.events] == list(range(steps[0], 1001, WINDOW))


def test_analysis_count_budget_defers_with_a_message():
    data = regression_data()
    monitor = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), data, action="report", max_analyses=1,
                            time_fraction=None)
    train(monitor.model, data, 600, monitor)
    first, *later = monitor.events
    assert first.action == "reported" and later
    assert all(e.action == "deferred" and e.verdict is None and "budget of 1 analyses" in e.message for e in later)
    assert monitor.spending.analyses == 1 and monitor.spending.deferred == len(later)
    # Deferrals at an unchanged loss back off too: the gaps double.
    steps = [e.step for e in monitor.events]
    assert [b - a for a, b in itertools.pairwise(steps)] == [WINDOW * 2**i for i in range(len(steps) - 1)]


def test_scheduler_rules_on_known_numbers():
    from saddlescope.monitor.policy import AnalysisBudget, AnalysisScheduler

    scheduler = AnalysisScheduler(AnalysisBudget(max_analyses=3, time_fraction=0.05, backoff=2.0), 50, 1e-3)
    spent = scheduler.spending
    spent.analysis_seconds, spent.training_seconds = 4.0, 10.0
    first = scheduler.decide(100)
    assert first.act == "analyse"  # the first stall is always analysed
    spent.analyses = 1
    assert scheduler.decide(100).act == "defer"  # 4 s of analyses > 5% of 10 s
    spent.training_seconds = 100.0
    decision = scheduler.decide(100)
    assert decision.act == "analyse" and decision.affordable_s == pytest.approx(1.0)
    scheduler.record(100, "saddle", 2.0, moved=False)
    assert scheduler.next_step == 150 and scheduler.decide(149).act == "quiet"
    scheduler.record(150, "saddle", 2.0 * (1 + 5e-4), moved=False)  # same verdict, loss within flat_tol
    assert scheduler.next_step == 250
    scheduler.record(250, "saddle", 2.0 * (1 + 5e-4), moved=False)
    assert scheduler.next_step == 450
    scheduler.record(450, "saddle", 1.9, moved=False)  # the loss moved: back to the window
    assert scheduler.next_step == 500
    scheduler.record(500, "saddle", 1.9, moved=True)  # an escape: back to the window
    assert scheduler.next_step == 550
    spent.analyses = 3
    assert scheduler.decide(550).act == "defer"
    with pytest.raises(InvalidInputError):
        AnalysisBudget(backoff=0.5)
    with pytest.raises(InvalidInputError):
        AnalysisBudget(time_fraction=0.0)


def test_training_and_monitor_time_are_measured_against_the_wall_clock():
    import time

    data = regression_data()
    model = zero_tanh_mlp()
    monitor = SaddleMonitor(model, nn.MSELoss(), data, action="report", window=5, grad_rtol=1.0)
    gaps = inside = 0.0
    left = None
    for step in range(30):
        time.sleep(0.002)  # "training"
        entered = time.perf_counter()
        if left is not None:
            gaps += entered - left
        monitor.step(1.0)  # a flat loss: a stall and its analysis at step 6
        left = time.perf_counter()
        inside += left - entered
    spent = monitor.spending
    assert spent.analyses >= 1 and 0 < spent.analysis_seconds <= spent.monitor_seconds
    # The monitor's clock sits inside the test's: its training time contains the test's gaps and
    # its own time is contained in the calls.
    assert gaps <= spent.training_seconds <= gaps + 0.05
    assert spent.monitor_seconds <= inside
    assert spent.training_seconds + spent.monitor_seconds == pytest.approx(gaps + inside, abs=0.05)
    assert spent.overhead == pytest.approx(spent.monitor_seconds / spent.training_seconds)


def test_escape_is_a_line_search_that_lowers_the_loss_and_says_what_it_cost():
    data = regression_data()
    model = zero_tanh_mlp()
    after = {}
    monitor = SaddleMonitor(model, nn.MSELoss(), data, action="escape",
                            callback=lambda e: after.setdefault(e.step, flat_params(model)))
    train(model, data, 200, monitor)
    event = next(e for e in monitor.events if e.action == "escaped")
    point, theta = event.critical_point, after[event.step]
    # Losses recomputed here, at the analysed point and at the parameters the escape left.
    assert event.loss_before == pytest.approx(loss_at(model, data, point.theta), rel=1e-12)
    assert event.loss_after == pytest.approx(loss_at(model, data, theta), rel=1e-12)
    assert event.loss_before - event.loss_after >= monitor.min_escape_decrease * event.loss_before
    # A straight step of the reported length, and the best of the line search's doubling grid.
    direction = (theta - point.theta) / event.step_size
    assert float(direction.norm()) == pytest.approx(1.0, rel=1e-9)
    alpha = event.step_size
    assert loss_at(model, data, point.theta + 0.5 * alpha * direction) > event.loss_after
    assert loss_at(model, data, point.theta + 2.0 * alpha * direction) >= event.loss_after
    # What it cost: the exact Hessian of n parameters takes n products; the line search's loss
    # evaluations; time that fits inside the monitor's.
    assert event.hvps == point.n_params == sum(p.numel() for p in model.parameters())
    assert event.loss_evaluations == event.escape["evaluations"] > 0
    assert 0 < event.escape["seconds"] < event.seconds <= monitor.spending.analysis_seconds
    record = json.loads(json.dumps(event.to_dict(), allow_nan=False))
    assert record["hvps"] == event.hvps and record["loss_before"] == event.loss_before
    metrics = event.metrics()
    assert metrics["saddlescope/escaped"] == 1.0 and metrics["saddlescope/verdict/saddle"] == 1.0
    assert metrics["saddlescope/loss_after"] == event.loss_after and metrics["saddlescope/hvps"] == event.hvps
    assert "HVPs" in event.message and "loss evaluations" in event.message


def test_an_escape_too_small_to_count_is_refused_and_leaves_the_parameters():
    data = regression_data()
    model = zero_tanh_mlp()
    monitor = SaddleMonitor(model, nn.MSELoss(), data, action="escape", min_escape_decrease=0.99)
    train(model, data, 160, monitor)
    event = monitor.events[0]
    assert (event.verdict, event.action, event.loss_after, event.step_size) == ("saddle", "no_escape", None, None)
    assert 0 < event.escape["decrease"] < event.escape["required_decrease"] and not event.escape["accepted"]
    assert "no escape" in event.message and "parameters left as they were" in event.message
    with torch.no_grad():
        assert all(float(p.abs().max()) == 0 for p in model[0].parameters())  # still exactly at zero


def test_the_time_budget_sends_a_large_model_to_the_cheap_verdict():
    # 2,410 parameters: the exact spectrum would take seconds; 5% of a few milliseconds of training
    # affords only the iterative verdict, which stops at the first certificate.
    from saddlescope.problems import digits_mlp

    problem = digits_mlp(init_scale=0.0, n_samples=200)
    model, data = problem.model, (problem.inputs, problem.targets)
    monitor = SaddleMonitor(model, problem.loss_fn, data, action="report", window=10, beta=0.5, grad_rtol=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(12):
        optimizer.zero_grad()
        loss = problem.loss_fn(model(data[0]), data[1])
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    event = monitor.events[0]
    assert event.kind == "stall" and event.analysis["method"] == "lanczos"
    assert event.critical_point.lambda_min < 0 and event.hvps < 0.1 * event.analysis["n_params"]


def test_bad_budget_arguments_raise_invalid_input():
    for kwargs in ({"max_analyses": -1}, {"time_fraction": float("inf")}, {"backoff": 0.9},
                   {"min_escape_decrease": -1.0}):
        with pytest.raises(InvalidInputError):
            SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), regression_data(), **kwargs)


def test_parameter_gradient_norm_is_accurate_at_scale():
    # A float32 norm summed in float32 reads 8e-5 low over 4M entries; the float64 norm is the truth.
    model = nn.Linear(2_000, 2_000)
    x = torch.randn(8, 2_000, generator=torch.Generator().manual_seed(0))
    monitor = SaddleMonitor(model, nn.MSELoss(), (x, torch.zeros(8, 2_000)), action="none")
    model(x).pow(2).mean().backward()
    monitor.step(1.0)
    truth = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert monitor.history.grad_norm[0] == pytest.approx(truth, rel=1e-6)


def test_parameter_gradient_norm_of_a_sparse_embedding():
    # An Embedding(sparse=True) gives a sparse .grad; its norm is that of the dense gradient.
    model = nn.Sequential(nn.Embedding(50, 4, sparse=True), nn.Flatten(), nn.Linear(12, 1))
    ids = torch.tensor([[1, 2, 2], [7, 1, 0]])
    monitor = SaddleMonitor(model, nn.MSELoss(), (ids, torch.zeros(2, 1)), action="none")
    model(ids).pow(2).mean().backward()
    assert model[0].weight.grad.is_sparse
    monitor.step(1.0)
    truth = math.sqrt(sum(float(p.grad.to_dense().double().pow(2).sum()) for p in model.parameters()))
    assert monitor.history.grad_norm[0] == pytest.approx(truth, rel=1e-6)  # float32 sums
