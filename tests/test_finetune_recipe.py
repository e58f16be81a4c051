"""The training recipe's options of `jqlora finetune`, each in a tiny end-to-end run:
--optimizer, --weight-decay, --adam-beta1/2, --adam-epsilon, --max-grad-norm, --lr-scheduler,
--warmup-steps/--warmup-ratio, --min-lr-ratio, --packing, --eval-data, --report-to."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import yaml
from finetune_tiny import chat_records, make_tiny_model_dir, texts_of, write_jsonl
from transformers import get_scheduler

from jqlora.app import config_io
from jqlora.app.cli import build_parser, main
from jqlora.train.optimizers import OPTIMIZERS
from jqlora.train.schedules import SCHEDULES

COMMON = ["--steps", "3", "--batch-size", "4", "--seq-len", "48", "--lr", "5e-3",
          "--lora-r", "4", "--eval-every", "3", "--save-every", "3", "--quant", "fp4"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    records = chat_records(24)
    model_dir = make_tiny_model_dir(root / "model", texts_of(records))
    data = write_jsonl(root / "data.jsonl", records)
    held_out = write_jsonl(root / "held_out.jsonl", chat_records(5))
    return model_dir, data, held_out


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _transformers_lrs(name, lr, total, warmup, min_lr_ratio=0.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    kwargs = {"min_lr_rate": min_lr_ratio} if name == "cosine_with_min_lr" else None
    sched = get_scheduler(name, opt, warmup, total, scheduler_specific_kwargs=kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_recipe_run(tiny, tmp_path):
    """8-bit AdamW with every hyper-parameter set, cosine to a minimum after a warm-up ratio,
    packing, a held-out file and TensorBoard: the run's lr per step is transformers', its
    config.yaml and report name the recipe, TensorBoard reads the events back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model_dir, data, held_out = tiny
    out = str(tmp_path / "run")
    flags = ["--optimizer", "adamw_8bit", "--weight-decay", "0.01", "--adam-beta1", "0.8",
             "--adam-beta2", "0.99", "--adam-epsilon", "1e-6", "--max-grad-norm", "0",
             "--lr-scheduler", "cosine_with_min_lr", "--warmup-ratio", "0.34",
             "--min-lr-ratio", "0.1", "--packing", "--eval-data", held_out,
             "--report-to", "tensorboard"]  # fmt: skip
    logs = []
    config = config_io.from_args(
        build_parser().parse_args(
            ["finetune", "--model", model_dir, "--data", data, "--out", out, *COMMON, *flags]
        )
    ).replace(progress=False, sample=False)
    from jqlora.app.loop import finetune

    result = finetune(config, log=logs.append)
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # warm-up: ceil(0.34 * 3) = 2 steps, as transformers' TrainingArguments
    expected = _transformers_lrs("cosine_with_min_lr", 5e-3, 3, 2, 0.1)
    assert [m["lr"] for m in metrics] == pytest.approx(expected, rel=1e-6)
    assert all(isinstance(m["tokens"], int) and m["tokens"] > 0 for m in metrics)
    assert result.n_eval == 5 and result.n_train == 24  # --eval-data: all of --data trains
    assert any("packed into" in line for line in logs)
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["optimizer"] == "adamw_8bit" and saved["weight_decay"] == 0.01
    assert (saved["adam_beta1"], saved["adam_beta2"], saved["adam_epsilon"]) == (0.8, 0.99, 1e-6)
    assert saved["max_grad_norm"] == 0.0 and saved["warmup_steps"] == 2
    assert saved["lr_scheduler"] == "cosine_with_min_lr" and saved["min_lr_ratio"] == 0.1
    assert saved["packing"] is True and saved["eval_data"] == os.path.abspath(held_out)
    assert saved["report_to"] == "tensorboard"
    report = open(os.path.join(out, "report.md")).read()
    assert (
        "- recipe: adamw_8bit (lr 0.005, weight decay 0.01, betas 0.8/0.99, eps 1e-06, no clipping)"
        in report
    )
    assert "schedule cosine_with_min_lr, warm-up 2 steps, min lr ratio 0.1; packing on" in report
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 3]  # before training, and after
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/learning_rate")] == pytest.approx(expected)
    assert {"train/grad_norm", "train/tokens_per_second"} <= set(acc.Tags()["scalars"])


def test_second_recipe_run(tiny, tmp_path):
    """Lion on a linear schedule with warm-up steps and clipping, no logger: the lr per step
    is transformers'; the report names the recipe."""
    model_dir, data, _ = tiny
    out = str(tmp_path / "run")
    flags = ["--optimizer", "lion", "--lr-scheduler", "linear", "--warmup-steps", "1",
             "--max-grad-norm", "0.5", "--report-to", "none", "--eval-fraction", "0.25"]  # fmt: skip
    assert (
        main(["finetune", "--model", model_dir, "--data", data, "--out", out, *COMMON, *flags]) == 0
    )
    metrics = _metrics(out)
    assert [m["lr"] for m in metrics] == pytest.approx(_transformers_lrs("linear", 5e-3, 3, 1))
    report = open(os.path.join(out, "report.md")).read()
    assert "- recipe: lion (lr 0.005" in report and "max grad norm 0.5" in report
    assert "schedule linear, warm-up 1 steps; packing off" in report
    assert "6 held-out" in report  # --eval-fraction 0.25 of 24
    assert not os.path.exists(os.path.join(out, "tensorboard"))


def test_every_choice_parses_and_bad_values_are_refused(tiny, capsys):
    model_dir, data, _ = tiny
    parser = build_parser()
    for name in OPTIMIZERS:
        assert (
            config_io.from_args(
                parser.parse_args(["finetune", "--optimizer", name])
            ).optim.optimizer
            == name
        )
    for name in SCHEDULES:
        c = config_io.from_args(parser.parse_args(["finetune", "--lr-scheduler", name]))
        assert c.schedule.lr_scheduler == name
    c = config_io.from_args(parser.parse_args(["finetune", "--report-to", "tensorboard,wandb"]))
    assert c.output.report_to == "tensorboard,wandb"
    bad = [
        (["--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
        (["--lr-scheduler", "cosin"], "argument --lr-scheduler: invalid choice"),
        (
            ["--warmup-steps", "2", "--warmup-ratio", "0.1"],
            "not allowed with argument --warmup-steps",
        ),
        (["--warmup-ratio", "1.5"], "argument --warmup-ratio: must be in [0, 1]"),
        (["--adam-beta2", "1"], "argument --adam-beta2: must be in [0, 1)"),
        (["--max-grad-norm", "-1"], "argument --max-grad-norm: must be a number >= 0"),
        (["--report-to", "mlflow"], "argument --report-to: unknown 'mlflow'"),
    ]
    for flags, message in bad:
        with pytest.raises(SystemExit):
            parser.parse_args(["finetune", *flags])
        assert message in capsys.readouterr().err, flags


def test_help_groups_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--help"])
    text = capsys.readouterr().out
    headings = ["model:", "data:", "adapter:", "optimizer and schedule:", "loop:", "output:"]
    places = [text.index("\n" + h + "\n") for h in headings]
    assert places == sorted(places)
    section = text[places[3] : places[4]]
    for flag in ("--optimizer", "--lr-scheduler", "--warmup-ratio", "--max-grad-norm"):
        assert flag in section


def test_missing_logger_package_is_an_input_error(tiny, tmp_path, capsys, monkeypatch):
    model_dir, data, _ = tiny
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = str(tmp_path / "run")
    argv = ["finetune", "--model", model_dir, "--data", data, "--out", out, "--report-to", "wandb"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "--report-to wandb needs the 'wandb' package" in err
        and "pip install 'jqlora[wandb]'" in err
    )
    assert not os.path.exists(out)  # refused before loading anything


def test_estimate_memory_optimizer_flag(tmp_path, capsys):
    """``jqlora estimate-memory --optimizer adamw_8bit`` counts the 8-bit state: a quarter of
    AdamW's and a little more (one absmax per 256 per moment) for Llama-2-7B at r=64."""
    cfg = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rows = {}
    for name in ("adamw", "adamw_8bit"):
        assert (
            main(
                ["estimate-memory", "--model", str(tmp_path), "--lora-r", "64", "--optimizer", name]
            )
            == 0
        )
        line = next(
            x for x in capsys.readouterr().out.splitlines() if x.startswith("optimizer state")
        )
        rows[name] = float(line.split()[2])
    assert rows["adamw"] == pytest.approx(1.279, abs=1e-3)  # 8 bytes x 159,907,840
    assert rows["adamw_8bit"] == pytest.approx(rows["adamw"] * (2 + 8 / 256) / 8, abs=2e-3)
