"""`saddlescope analyze --model/--checkpoint/--data` and `ss.analyze_model`: a user's own model.

Truth comes from outside the engine: Hessians from `torch.func.hessian` of hand-written losses over
`functional_call`, Hugging Face's own loss, and files that would betray executed code.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.func import functional_call

import saddlescope as ss
from saddlescope import errors, examples
from saddlescope.loading import import_object, load_checkpoint, read_state_dict, resolve_loss

FIXTURES = Path(__file__).parent / "fixtures"
USER = str(FIXTURES / "user_models.py")
SMALL_CNN = {"channels": 2, "hidden": 8}


def run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "saddlescope.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def trained_cnn_checkpoint(tmp_path, steps=40):
    """A small digits CNN trained a little (so its weights differ from any fresh initialisation)."""
    model = examples.digits_cnn(**SMALL_CNN, seed=1)
    batches = examples.digits_batches()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    path = tmp_path / "cnn.pt"
    torch.save(model.state_dict(), path)
    return model, path


def reference_hessian(model, batches, loss_of_outputs, names=None):
    """Hessian of the full-data mean loss by torch.func.hessian over functional_call (no saddlescope)."""
    model = model.double().eval()
    params = {n: p.detach() for n, p in model.named_parameters() if names is None or n in names}
    buffers = {n: b for n, b in model.named_buffers()}
    keys = list(params)
    sizes = [params[k].numel() for k in keys]
    shapes = [params[k].shape for k in keys]
    total = sum(len(y) for _, y in batches)

    def f(flat):
        state = dict(buffers)
        state.update({k: t.view(s) for k, t, s in zip(keys, torch.split(flat, sizes), shapes)})
        value = 0.0
        for x, y in batches:
            out = functional_call(model, state, (x.double(),))
            value = value + loss_of_outputs(out, y.double() if y.is_floating_point() else y) * len(y)
        return value / total

    flat = torch.cat([params[k].reshape(-1) for k in keys])
    return f(flat), torch.func.hessian(f)(flat)


# ----------------------------------------------------------------------------------- Python API
def test_cnn_with_batchnorm_and_dropout_matches_an_independent_hessian(tmp_path):
    trained, ckpt = trained_cnn_checkpoint(tmp_path)
    batches = examples.digits_batches()
    result = ss.analyze_model(examples.digits_cnn, batches, model_kwargs=SMALL_CNN, checkpoint=ckpt,
                              dtype="float64")
    cp = result.point
    loss, hessian = reference_hessian(trained, batches, F.cross_entropy)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert cp.method == "exact" and cp.n_params == hessian.shape[0] == 20 + 4 + 264 + 90
    assert cp.loss == pytest.approx(float(loss), rel=1e-12)  # the checkpoint's weights, Dropout off
    torch.testing.assert_close(cp.eigenvalues, eigenvalues, rtol=0, atol=1e-9 * float(eigenvalues.abs().max()))
    fresh = examples.digits_cnn(**SMALL_CNN, seed=1).double().eval()
    with torch.no_grad():
        fresh_loss = sum(F.cross_entropy(fresh(x.double()), y) * len(y) for x, y in batches) / 256
    assert abs(float(fresh_loss) - cp.loss) > 1e-3  # the checkpoint was really loaded
    assert result.objective.description["loss"] == "cross_entropy"
    assert result.checkpoint.format == "torch" and result.checkpoint.n_tensors == len(trained.state_dict())


def test_safetensors_and_nested_checkpoints_give_the_same_weights(tmp_path):
    trained, ckpt = trained_cnn_checkpoint(tmp_path, steps=5)
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(state, str(tmp_path / "cnn.safetensors"))
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "nested.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    for name, nested, prefix in (("cnn.safetensors", None, None), ("nested.pt", "model_state_dict", None),
                                 ("ddp.pt", None, "module.")):
        model = examples.digits_cnn(**SMALL_CNN, seed=7)
        info = load_checkpoint(model, tmp_path / name)
        assert (info.nested_key, info.stripped_prefix) == (nested, prefix)
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), (name, key)


def test_a_checkpoint_that_carries_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):  # unpickling would call open(marker, "w"), creating the file
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"weight": Payload()}, fh)
    with pytest.raises(errors.UnsafeCheckpointError, match="pickled code"):
        read_state_dict(evil)
    assert not marker.exists()
    whole = tmp_path / "whole_model.pt"
    torch.save(examples.digits_cnn(**SMALL_CNN), whole)  # a pickled nn.Module, not a state dict
    with pytest.raises(errors.UnsafeCheckpointError, match="state_dict"):
        read_state_dict(whole)


def test_mismatched_checkpoint_names_the_keys_and_shapes(tmp_path):
    torch.save(examples.digits_cnn(channels=4, hidden=8).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(errors.CheckpointMismatchError, match=r"features\.0\.weight: checkpoint \(4, 1, 3, 3\)"):
        load_checkpoint(examples.digits_cnn(**SMALL_CNN), tmp_path / "wide.pt")
    partial = {k: v for k, v in examples.digits_cnn(**SMALL_CNN).state_dict().items() if not k.startswith("head.4")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(errors.CheckpointMismatchError, match=r"2 missing \(head\.4\.weight, head\.4\.bias\)"):
        load_checkpoint(examples.digits_cnn(**SMALL_CNN), tmp_path / "partial.pt")


def test_hugging_face_gpt2_from_config_with_dict_inputs():
    pytest.importorskip("transformers")
    batches = examples.token_batches(n_sequences=8, length=10, vocab_size=32, batch_size=4)
    model = examples.tiny_gpt2(n_layer=1, n_embd=8, n_head=2, vocab_size=32, n_positions=16)
    result = ss.analyze_model(model, batches, loss="lm", dtype="float64", method="lanczos", k=2)
    hf = model.double().eval()
    reference = sum(float(hf(input_ids=b[0]["input_ids"], labels=b[1]).loss) for b in batches) / len(batches)
    # Hugging Face's own shifted loss; it casts the logits to float32, hence the tolerance.
    assert result.point.loss == pytest.approx(reference, rel=1e-6)
    assert result.point.method == "lanczos" and result.point.kind == "not_critical"
    assert result.point.lambda_max > 0 and result.objective.description["loss"] == "lm"
    # Targets that are the input tokens: "auto" must not pick unshifted cross-entropy.
    assert resolve_loss("auto", model, batches[0])[1] == "lm"
    generator = (batch for batch in batches)  # a one-shot iterator is read once and kept
    again = ss.analyze_model(model, generator, dtype="float64", method="lanczos", k=1, memory_budget="2MB")
    assert again.point.loss == pytest.approx(result.point.loss, rel=1e-12)
    # A memory budget in words reaches the eigensolver's plan and the record.
    assert again.point.lanczos["top"]["plan"]["budget"] == again.settings["memory_budget"] == 2_000_000


def test_lightning_module_is_differentiated_through_its_training_step():
    pytest.importorskip("lightning")
    user = import_object(f"{USER}:lit_regressor", what="--model")
    batches = import_object(f"{USER}:regression_batches", what="--data")()
    result = ss.analyze_model(user, batches, dtype="float64")
    assert result.objective.description["loss"] == "lightning"
    module = user()
    weight_decay = module.weight_decay

    def step_loss(out, y):  # the training_step's loss written out by hand: MSE + L2 penalty
        return F.mse_loss(out, y)

    loss, hessian = reference_hessian(module.net, batches, step_loss)
    hessian = hessian + weight_decay * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    flat = torch.cat([p.detach().double().reshape(-1) for p in module.net.parameters()])
    loss = loss + 0.5 * weight_decay * flat.square().sum()
    assert result.point.loss == pytest.approx(float(loss), rel=1e-12)
    torch.testing.assert_close(result.point.eigenvalues, torch.linalg.eigvalsh(hessian), rtol=0, atol=1e-10)


def test_lightning_trainer_checkpoint_loads(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    user = import_object(f"{USER}:lit_regressor", what="--model")
    batches = import_object(f"{USER}:regression_batches", what="--data")()
    module = user()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    trainer.save_checkpoint(tmp_path / "lit.ckpt")
    result = ss.analyze_model(user, batches, checkpoint=tmp_path / "lit.ckpt", dtype="float64")
    assert result.checkpoint.nested_key == "state_dict"
    trained = torch.cat([p.detach().double().reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(result.point.theta, trained, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_analyzes_a_users_model_and_writes_the_report(tmp_path):
    _, ckpt = trained_cnn_checkpoint(tmp_path, steps=10)
    out = tmp_path / "report"
    res = run("analyze", "--model", "saddlescope.examples:digits_cnn", "--model-kwargs", json.dumps(SMALL_CNN),
              "--checkpoint", str(ckpt), "--data", "saddlescope.examples:digits_batches", "--dtype", "float64",
              "--json", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    printed = json.loads(res.stdout)
    api = ss.analyze_model(examples.digits_cnn, examples.digits_batches, model_kwargs=SMALL_CNN, checkpoint=ckpt,
                           dtype="float64").point
    assert printed["kind"] == api.kind
    assert printed["eigenvalues"] == pytest.approx(api.eigenvalues.tolist(), abs=1e-9)
    assert printed["checkpoint"]["path"] == str(ckpt) and printed["objective"]["loss"] == "cross_entropy"
    written = json.loads(Path(printed["files"]["json"]).read_text())
    assert written["lambda_min"] == pytest.approx(printed["lambda_min"])
    assert "digits_cnn" in written["settings"]["command"]
    page = Path(printed["files"]["html"]).read_text()
    assert "cross_entropy" in page and f"{printed['n_params']:,} parameters" in page
    assert Path(printed["files"]["png_spectrum"]).read_bytes()[:4] == b"\x89PNG"


def test_cli_imports_a_file_and_runs_a_lightning_module():
    pytest.importorskip("lightning")
    res = run("analyze", "--model", f"{USER}:lit_regressor", "--data", f"{USER}:regression_batches",
              "--dtype", "float64", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["objective"]["loss"] == "lightning" and out["n_params"] == 3 * 6 + 6 + 6 + 1


def _one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-1500:])
    assert "Traceback" not in res.stderr
    text = res.stderr.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, (needle, text)


def test_cli_bad_input_gets_one_line_naming_the_problem(tmp_path):
    torch.save(examples.digits_cnn(channels=4).state_dict(), tmp_path / "wide.pt")
    data = "saddlescope.examples:digits_batches"
    cases = [
        (["--model", "no_such_pkg.models:factory", "--data", data], ["cannot import module 'no_such_pkg.models'"]),
        (["--model", "saddlescope.examples:nope", "--data", data], ["has no attribute 'nope'"]),
        (["--model", f"{USER}:broken_factory", "--data", data], ["weights folder not configured"]),
        (["--model", f"{USER}:not_a_model", "--data", data], ["nn.Module"]),
        (["--model", "saddlescope.examples:digits_cnn", "--model-kwargs", json.dumps(SMALL_CNN),
          "--checkpoint", str(tmp_path / "wide.pt"), "--data", data], ["does not match the model", "--model-kwargs"]),
        (["--model", "saddlescope.examples:digits_cnn", "--checkpoint", str(tmp_path / "missing.pt"), "--data",
          data], ["missing.pt", "does not exist"]),
        (["--model", str(tmp_path / "missing.py") + ":f", "--data", data], ["does not exist"]),
        (["--model", f"{USER}:mlp", "--data", f"{USER}:wrong_width_batches"], ["shape (8, 5)"]),
        (["--model", f"{USER}:mlp", "--data", f"{USER}:regression_batches", "--loss", f"{USER}:per_sample_loss"],
         ["scalar"]),
        (["--model", "saddlescope.examples:digits_cnn", "--model-kwargs", '{"hidden": 1024}', "--data", data,
          "--method", "exact"], ["GiB", "--method lanczos"]),
        (["--model", "saddlescope.examples:digits_cnn", "--model-kwargs", "{hidden: 4}", "--data", data],
         ["--model-kwargs must be a JSON object"]),
        (["--model", "saddlescope.examples:digits_cnn"], ["--model needs --data"]),
        (["--model", "saddlescope.examples:digits_cnn", "--data", data, "--loss", "hinge"], ["unknown loss 'hinge'"]),
        (["--problem", "seed-toy", "--data", data], ["--data goes with --model"]),
        (["--model", "saddlescope.examples:digits_cnn", "--data", data, "--device", "gpu0"],
         ["device 'gpu0' is not a device PyTorch knows", "'cuda:1'"]),
        (["--problem", "seed-toy", "--device", "cpu"], ["--device goes with --model"]),
    ]
    for args, needles in cases:
        _one_line_error(run("analyze", *args), *needles)


def test_cli_refuses_a_pickled_whole_model_saying_what_to_save(tmp_path):
    whole = tmp_path / "whole_model.pt"
    torch.save(examples.digits_cnn(**SMALL_CNN), whole)  # torch.save(model): pickled code, not weights
    res = run("analyze", "--model", "saddlescope.examples:digits_cnn", "--model-kwargs", json.dumps(SMALL_CNN),
              "--checkpoint", str(whole), "--data", "saddlescope.examples:digits_batches")
    _one_line_error(res, "whole_model.pt", "saddlescope.examples.DigitsCNN", "torch.save(model.state_dict(), path)",
                    "nothing in it was run")
    for advice in ("add_safe_globals", "safe_globals", "weights_only", "trust"):  # torch's way to run the code
        assert advice not in res.stderr, res.stderr
