"""The monitor inside the trainers people use, its events in their own loggers.

A real Hugging Face ``Trainer`` (a tiny GPT-2 built from a config: no download), a real Lightning
``Trainer`` and a plain loop; TensorBoard event files are read back with TensorBoard's own reader,
and the loss the monitor saw is compared with the loss each trainer logs itself.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from saddlescope.errors import InvalidInputError
from saddlescope.monitor import SaddleMonitor

# Small windows and generous thresholds: a stall (and its analysis) within a few steps.
QUICK = {"window": 3, "beta": 0.5, "flat_tol": 1.0, "grad_rtol": 1.0}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_scalars(folder):
    """{tag: [(step, value), ...]} from the TensorBoard event files under ``folder``."""
    accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    files = sorted(Path(folder).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    scalars = {}
    for path in files:
        accumulator = accumulator_module.EventAccumulator(str(path.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def regression_data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x, torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:] + 0.3


def zero_tanh_mlp(hidden=8):
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


# ------------------------------------------------------------------------------ plain loop
def test_plain_loop_helper_writes_events_to_tensorboard_and_a_log_function(tmp_path):
    writer_module = pytest.importorskip("torch.utils.tensorboard")
    pytest.importorskip("tensorboard")
    x, y = regression_data()
    model = zero_tanh_mlp()
    # QUICK's flat_tol of 1 would also be the default escape threshold (100%): ask for 0.1%.
    monitor = SaddleMonitor(model, nn.MSELoss(), (x, y), action="escape", min_escape_decrease=1e-3, **QUICK)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logged = []
    offset = 1000  # the loop's own step numbering, not the monitor's
    writer = writer_module.SummaryWriter(str(tmp_path))
    with monitor.watch(writer=writer, log=lambda metrics, step: logged.append((step, metrics))) as after_step:
        for step in range(offset, offset + 12):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            after_step(loss, step)
    writer.close()
    assert monitor.events and logged
    assert [step for step, _ in logged] == [offset + e.step - 1 for e in monitor.events]
    event = monitor.events[0]
    assert event.action == "escaped"
    scalars = read_scalars(tmp_path)
    for tag, value in event.metrics().items():
        assert scalars[tag][0] == (offset + event.step - 1, pytest.approx(value, rel=1e-6)), tag
    assert scalars["saddlescope/escaped"][0][1] == 1.0
    assert logged[0][1] == event.metrics()


def test_plain_loop_helper_refuses_what_is_not_a_writer():
    monitor = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), regression_data())
    with pytest.raises(InvalidInputError, match="add_scalar"):
        monitor.watch(writer="runs/a")
    with pytest.raises(InvalidInputError, match="callable"):
        monitor.watch(log=42)


# ------------------------------------------------------------------------------ lightning
def test_lightning_events_reach_the_trainers_tensorboard_logger(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
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
    monitor = SaddleMonitor(module, nn.MSELoss(), (x, y), action="report", **QUICK)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(max_epochs=8, callbacks=[monitor.lightning_callback()], logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert len(monitor.history) == 8 and monitor.events
    event = monitor.events[0]
    assert event.verdict is not None and event.analysis["lambda_min"] < 0  # the zero net's saddle curvature
    scalars = read_scalars(tmp_path)
    # Logged at the trainer's global step when the callback ran (one optimizer step per batch).
    assert scalars["saddlescope/lambda_min"][0] == (event.step, pytest.approx(event.analysis["lambda_min"], rel=1e-6))
    assert scalars[f"saddlescope/verdict/{event.verdict}"][0][1] == 1.0


# ------------------------------------------------------------------------------ transformers
def tiny_trainer(tmp_path, model, accumulation):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    from saddlescope.examples import token_batches

    ids = torch.cat([b[0]["input_ids"] for b in token_batches(n_sequences=16, length=8, vocab_size=32)])

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, logging_steps=1, report_to=["tensorboard"],
        save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens())


def test_transformers_trainer_feeds_its_own_loss_and_logs_events(tmp_path):
    pytest.importorskip("transformers")
    from saddlescope.examples import tiny_gpt2, token_batches
    from saddlescope.loading import resolve_loss

    model = tiny_gpt2(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16)
    lm_loss, _ = resolve_loss("lm")
    probe = token_batches(n_sequences=8, length=8, vocab_size=32, batch_size=8)
    monitor = SaddleMonitor(model, lm_loss, probe, action="report", **QUICK)
    trainer = tiny_trainer(tmp_path, model, accumulation=2)
    callback = monitor.transformers_callback(trainer)
    assert callback in trainer.callback_handler.callbacks
    with pytest.raises(InvalidInputError, match="already"):
        monitor.transformers_callback(trainer)  # a second one would count every loss twice
    trainer.train()

    # The loss the monitor saw at each optimizer step is the one the Trainer logged for that step
    # (two micro-batches each), and no step's own log went missing.
    own = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert sorted(own) == list(range(1, 7))
    assert monitor.history.loss == pytest.approx([own[s] for s in range(1, 7)], rel=1e-6)
    assert monitor.events
    event = monitor.events[0]
    assert event.kind == "stall" and event.verdict is not None and event.hvps > 0
    logged = [h for h in trainer.state.log_history if "saddlescope/stall" in h]
    assert len(logged) == len(monitor.events) and logged[0]["step"] == event.step
    assert logged[0]["saddlescope/lambda_min"] == event.analysis["lambda_min"]
    # ...and through report_to=["tensorboard"] into the Trainer's event file.
    scalars = read_scalars(tmp_path)
    assert scalars["train/saddlescope/lambda_min"][0] == (event.step, pytest.approx(event.analysis["lambda_min"], rel=1e-6))
    assert scalars["train/saddlescope/hvps"][0][1] == event.hvps
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 7))


def test_transformers_callback_refuses_another_model_and_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from saddlescope.examples import tiny_gpt2

    model = tiny_gpt2(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16)
    trainer = tiny_trainer(tmp_path, model, accumulation=1)
    monitor = SaddleMonitor(zero_tanh_mlp(), nn.MSELoss(), regression_data())
    with pytest.raises(InvalidInputError, match="trainer.model"):
        monitor.transformers_callback(trainer)
    with pytest.raises(InvalidInputError, match="Trainer"):
        monitor.transformers_callback(object())
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        monitor.transformers_callback(trainer)


def test_import_saddlescope_stays_light():
    code = ("import sys, saddlescope, saddlescope.monitor; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning', 'tensorboard') "
            "if m in sys.modules))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
