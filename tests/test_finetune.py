"""`jqlora finetune` end to end on a tiny Llama: resume is bit-exact, outputs load in PEFT."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from finetune_tiny import chat_records, make_tiny_model_dir, texts_of, write_jsonl
from safetensors.numpy import load_file

from jqlora.app import loop
from jqlora.app.cli import main
from jqlora.app.config import FinetuneConfig
from jqlora.app.run_args import checkpoint_to_resume
from jqlora.train import checkpoint as ckpt

# seq_len 32 holds every example in one bucket: one compiled step per run.
RUN = dict(
    batch_size=4,
    grad_accum=2,
    seq_len=32,
    lr=5e-3,
    lora_r=4,
    lora_alpha=8,
    eval_every=2,
    save_every=2,
    sample=False,
    progress=False,
    log=lambda *a: None,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    records = chat_records(24)
    model_dir = make_tiny_model_dir(root / "model", texts_of(records))
    return model_dir, write_jsonl(root / "data.jsonl", records)


def adapter_bytes(out) -> bytes:
    with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
        return f.read()


def losses(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"], m.get("eval_loss")) for m in map(json.loads, f)]


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    """An uninterrupted 5-step run."""
    model_dir, data = tiny
    return loop.finetune(
        model=model_dir, data=data, out=str(tmp_path_factory.mktemp("whole")), steps=5, **RUN
    )


@pytest.mark.slow  # second tier: kill and resume (tests/README.md)
def test_run_killed_during_a_save_resumes_to_the_identical_adapter(
    tiny, whole, tmp_path, monkeypatch
):
    model_dir, data = tiny

    # The second run dies while writing its step-4 checkpoint: the files are written, the
    # rename that publishes them never happens.
    finalize = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

    async def killed_at_step_4(self):
        if self.get_final().name == "step_00000004":
            raise KeyboardInterrupt("killed")
        await finalize(self)

    out = str(tmp_path / "resumed")
    with monkeypatch.context() as killed:
        killed.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", killed_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            loop.finetune(model=model_dir, data=data, out=out, steps=5, **RUN)
    assert ckpt.latest_checkpoint(os.path.join(out, "checkpoints")).endswith("step_00000002")

    resumed = loop.finetune(model=model_dir, data=data, out=out, steps=5, resume=True, **RUN)
    flat = lambda t: [np.asarray(x) for x in __import__("jax").tree.leaves(t)]
    assert all((a == b).all() for a, b in zip(flat(whole.lora), flat(resumed.lora), strict=True))
    assert adapter_bytes(whole.out) == adapter_bytes(out)
    assert losses(whole.out) == losses(out)  # steps 3-4 were logged twice, kept once
    assert resumed.eval_loss_before == whole.eval_loss_before
    assert whole.eval_loss_after < whole.eval_loss_before


def test_cli_trains_and_writes_a_peft_adapter_that_peft_loads(tiny, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import jqlora
    from jqlora.hf.peft import load_peft_adapter

    model_dir, data = tiny
    out = str(tmp_path / "run")
    argv = [
        "finetune",
        "--model",
        model_dir,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "5e-3",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--quant",
        "none",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--lora-dropout",
        "0.1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "eval loss:" in printed and "sample before:" in printed and "sample after:" in printed
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "loss.png",
        "report.md",
        "metrics.jsonl",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"step", "loss", "tokens_per_s"} <= m.keys() for m in metrics)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    report = open(os.path.join(out, "report.md")).read()
    assert "eval loss:" in report and "tokens/s" in report and "peak host memory" in report

    # The adapter, read by peft onto the transformers model, computes what jqlora computes.
    ids = np.array([[1, 5, 9, 30, 7, 2, 11, 40]])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids)).logits.numpy()
    model, params = jqlora.load_hf(model_dir)
    lora, _ = load_peft_adapter(out, params)
    ours = np.asarray(model.apply({"params": params, "lora": lora}, ids))
    plain = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(ours - plain).max() > 1e-3  # training moved the adapter off zero
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_user_mistakes_exit_2_with_a_message(tiny, tmp_path, capsys):
    model_dir, data = tiny
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no completion"\n')
    common = ["finetune", "--model", model_dir, "--steps", "1"]
    assert main(common + ["--data", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert (
        main(
            common
            + ["--data", data, "--out", str(tmp_path / "y"), "--target-modules", "nothing_here"]
        )
        == 2
    )
    assert "nothing_here" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path / "missing"), "--data", data]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: steps and epochs are exclusive, values positive
        main(common + ["--epochs", "1"])
    with pytest.raises(SystemExit):
        main(["finetune", "--lr", "-1"])


def test_existing_run_needs_resume_and_the_same_settings(tiny, whole, tmp_path, capsys):
    model_dir, data = tiny
    out = str(tmp_path / "run")
    shutil.copytree(whole.out, out)

    def argv(r="4", *extra):
        return [
            "finetune",
            "--model",
            model_dir,
            "--data",
            data,
            "--out",
            out,
            "--batch-size",
            "4",
            "--grad-accum",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "5e-3",
            "--lora-r",
            r,
            "--lora-alpha",
            "8",
            "--steps",
            "5",
            *extra,
        ]

    assert main(argv()) == 2
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    assert main(argv("8", "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot resume with different settings" in err and "lora_r" in err
    # scan_layers rounds differently in bfloat16: a run cannot switch it either...
    assert main(argv("4", "--resume", "--scan-layers")) == 2
    assert "scan_layers" in capsys.readouterr().err
    # ...and a run whose config.yaml predates the setting resumes as an unscanned run.
    latest = ckpt.latest_checkpoint(os.path.join(out, "checkpoints"))
    path = os.path.join(out, "config.yaml")
    with open(path) as f:
        saved = yaml.safe_load(f)
    del saved["scan_layers"]
    with open(path, "w") as f:
        yaml.safe_dump(saved, f)
    config = FinetuneConfig.from_dict({**saved, "out": out, "resume": True})
    assert checkpoint_to_resume(config) == latest
    with pytest.raises(ValueError, match="scan_layers: False -> True"):
        checkpoint_to_resume(config.replace(scan_layers=True))


@pytest.mark.slow  # second tier: two finetune runs against each other
def test_scan_layers_run_equals_the_unrolled_run(tiny, tmp_path):
    """A run with ``scan_layers`` (dropout on: the loop draws the unrolled masks) trains the
    adapter the unrolled run trains; in float32, since in bfloat16 the two programs round
    differently (see test_scan_layers)."""
    model_dir, data = tiny
    run = {**RUN, "compute_dtype": "float32"}
    adapters = [
        loop.finetune(
            model=model_dir,
            data=data,
            out=str(tmp_path / f"scan-{scan}"),
            steps=3,
            scan_layers=scan,
            **run,
        )
        for scan in (False, True)
    ]
    want, got = (load_file(os.path.join(a.out, "adapter_model.safetensors")) for a in adapters)
    assert got.keys() == want.keys()
    # Adam divides each gradient by its own scale: where one is near zero, the programs'
    # last-bit differences move the adapter by a little of one step (lr); 1e-5 is 0.2 % of it.
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=2e-3 * RUN["lr"], err_msg=k)


@pytest.mark.slow
def test_default_model_and_data_train_a_few_real_steps(tmp_path):
    """The default run's pieces on the real SmolLM2-135M GGUF: three steps lower the eval loss."""
    result = loop.finetune(
        out=str(tmp_path / "real"),
        steps=3,
        batch_size=4,
        lr=1e-3,
        warmup_steps=0,
        eval_every=3,
        save_every=3,
        sample=False,
        progress=False,
        log=lambda *a: None,
    )
    assert result.n_train > 300 and result.n_eval > 30
    assert result.eval_loss_after < result.eval_loss_before
    assert os.path.exists(tmp_path / "real" / "adapter_model.safetensors")


@pytest.mark.slow  # a 4-device run in a subprocess, twice (scan_layers)
def test_mesh_run_equals_one_device(tiny, whole, tmp_path):
    """`finetune(mesh="data=2,fsdp=2")` on 4 host devices (a subprocess, so this process keeps
    one device) trains the same adapter as the single-device run, with the layers unrolled
    and with ``scan_layers`` (the loop over layers whose params are sharded)."""
    import subprocess
    import sys

    model_dir, data = tiny
    script = "from jqlora.app import loop\n" + (
        f"run = dict({', '.join(f'{k}={v!r}' for k, v in RUN.items() if k != 'log')})\n"
    )
    for scan in (False, True):
        script += (
            f"loop.finetune(model={str(model_dir)!r}, data={data!r}, "
            f"out={str(tmp_path / f'mesh-{scan}')!r}, "
            f"steps=5, mesh='data=2,fsdp=2', scan_layers={scan}, log=lambda *a: None, **run)\n"
        )
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = load_file(os.path.join(whole.out, "adapter_model.safetensors"))
    # The loop's rounding differs from the unrolled program's: Adam turns that into a little
    # of one step (lr) where a gradient is near zero (test_scan_layers_run_equals_...).
    for scan, atol in ((False, 1e-6), (True, 2e-3 * RUN["lr"])):
        got = load_file(str(tmp_path / f"mesh-{scan}" / "adapter_model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=atol, err_msg=f"{scan} {k}")
