"""The one run configuration (jqlora/app/config.py): the flags of `jqlora finetune` come
from `FinetuneConfig`, ``--config`` files (YAML or JSON) hold the same keys, flags given
replace the file's values, every run writes its resolved settings to OUT/config.yaml,
``--resume`` names each setting that differs from that file, and the round trip
flags -> OUT/config.yaml -> ``--config`` is the same run (the same adapter, bit for bit)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import pytest
import yaml
from finetune_tiny import chat_records, make_tiny_model_dir, texts_of, write_jsonl

from jqlora.app import config as config_lib
from jqlora.app import config_io
from jqlora.app.cli import build_parser, main
from jqlora.app.config import OPTIONS, FinetuneConfig
from jqlora.hf import QuantConfig
from jqlora.lora import LoraConfig


def parse(*argv) -> FinetuneConfig:
    return config_io.from_args(build_parser().parse_args(["finetune", *argv]))


def finetune_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return group.choices["finetune"]


def test_every_flag_is_an_option_and_shows_the_configs_default():
    defaults = FinetuneConfig().to_dict()
    flags = {a.dest: a for a in finetune_parser()._actions if a.option_strings and a.dest != "help"}
    assert set(flags) - {"config"} == {k for k, r in OPTIONS.items() if r.option.flag}
    for key, action in flags.items():
        if key == "config":
            continue
        assert action.option_strings == ["--" + key.replace("_", "-")]
        want = defaults[key]
        if key == "quant":  # the shorthand of the default QuantConfig
            want = "nf4"
        assert action.default == want, key
    # No flags at all: the defaults, which are QLoRA's recipe.
    assert parse() == FinetuneConfig()
    assert FinetuneConfig().quant == QuantConfig("nf4", 64, True, ("lm_head",))


def test_flags_set_the_nested_config():
    config = parse(
        "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8", "--quant", "fp4",
        "--target-modules", "q_proj,v_proj", "--steps", "7", "--offload-optimizer",
        "--remat", "--seed", "3", "--out", "somewhere",
    )  # fmt: skip
    assert config.optim.lr == 1e-3 and config.optim.offload
    assert config.lora.r == 4 and config.lora.alpha == 8
    assert config.lora.target_modules == ("q_proj", "v_proj")
    assert config.quant == QuantConfig("fp4")
    assert config.loop.steps == 7 and config.loop.seed == 3 and config.model.remat
    assert config.output.dir == "somewhere"
    assert parse("--quant", "none").quant is None


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_sets_options_and_flags_given_replace_them(tmp_path, suffix):
    values = {"lr": 1e-3, "lora-r": 4, "epochs": 2, "quant": "fp4", "mesh": {"data": 2}}
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(values) if suffix == ".json" else yaml.safe_dump(values))
    from_file = parse("--config", str(path))
    assert from_file.optim.lr == 1e-3 and from_file.lora.r == 4
    assert from_file.loop.epochs == 2 and from_file.quant == QuantConfig("fp4")
    assert from_file.loop.mesh == {"data": 2}
    # A flag replaces the file's value, even one equal to the default; --steps replaces the
    # file's --epochs (the two exclude each other).
    both = parse("--config", str(path), "--lr", "2e-4", "--steps", "3")
    assert both.optim.lr == 2e-4 and both.loop.steps == 3 and both.loop.epochs is None
    assert both.lora.r == 4


def test_config_file_mistakes_exit_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    for text, message in (
        ("lr: 0\n", "lr must be a number > 0, got 0"),
        ("lora_r: 2.5\n", "lora_r expected an integer, got 2.5"),
        ("learning_rate: 1e-3\n", "unknown option(s) learning_rate"),
        ("quant: int8\n", "quant_type 'int8' is not one of"),
        ("[1, 2]\n", "expected a mapping of option: value"),
        ("lr: [\n", "not valid YAML"),
    ):
        bad.write_text(text)
        assert main(["finetune", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (text, err)
    assert main(["finetune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err


def test_the_python_api_takes_the_same_checks_and_library_configs():
    config = FinetuneConfig(
        lora=LoraConfig(r=4, alpha=8, use_rslora=True),
        quant="fp4",  # type: ignore[arg-type]
    )
    assert config.quant == QuantConfig("fp4") and config.lora.use_rslora
    assert config.replace(lora_r=2).lora == dataclasses.replace(config.lora, r=2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        config_lib.DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="give steps or epochs, not both"):
        config_lib.LoopConfig(steps=1, epochs=1.0)
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        config.replace(learning_rate=1)


def test_a_config_round_trips_through_its_dict():
    config = parse("--lr", "1e-3", "--quant", "none", "--mesh", "data=2,fsdp=2", "--epochs", "2")
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    assert FinetuneConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_resume_differences_name_each_key_and_skip_the_resumable_ones():
    saved = FinetuneConfig().to_dict()
    now = FinetuneConfig().replace(lr=1e-3, lora_r=4, steps=99, out="elsewhere", resume=True)
    assert config_io.differences(saved, now) == {"lr": (2e-4, 1e-3), "lora_r": (16, 4)}
    # A key the saved file lacks (an option newer than the run) counts as its default.
    del saved["scan_layers"]
    assert "scan_layers" not in config_io.differences(saved, FinetuneConfig())
    assert "scan_layers" in config_io.differences(saved, now.replace(scan_layers=True))
    resumable = {k for k, r in OPTIONS.items() if r.option.resumable}
    assert {"steps", "epochs", "out", "resume", "eval_every", "save_every"} <= resumable


# ------------------------------------------------------------------ runs on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    records = chat_records(24)
    model_dir = make_tiny_model_dir(root / "model", texts_of(records))
    return model_dir, write_jsonl(root / "data.jsonl", records)


FLAGS = ["--steps", "3", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32",
         "--lr", "5e-3", "--lora-r", "4", "--lora-alpha", "8", "--eval-every", "3",
         "--save-every", "3", "--quant", "fp4", "--seed", "3"]  # fmt: skip


def _adapter(out) -> bytes:
    with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def flag_run(tiny, tmp_path_factory):
    """A run from flags: its output directory."""
    model_dir, data = tiny
    out = str(tmp_path_factory.mktemp("flags") / "run")
    assert main(["finetune", "--model", model_dir, "--data", data, "--out", out, *FLAGS]) == 0
    return out


def test_config_yaml_repeats_the_run(flag_run, tmp_path):
    with open(os.path.join(flag_run, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    # Resolved: the data file's absolute path, the compute dtype, the warm-up (3 % of 3 steps).
    assert os.path.isabs(saved["data"]) and saved["compute_dtype"] == "float32"
    assert saved["warmup_steps"] == 1 and saved["seed"] == 3
    assert saved["quant"]["quant_type"] == "fp4" and saved["lora_r"] == 4
    again = str(tmp_path / "again")
    config = os.path.join(flag_run, "config.yaml")
    assert main(["finetune", "--config", config, "--out", again]) == 0
    assert _adapter(again) == _adapter(flag_run)
    with open(os.path.join(again, "config.yaml")) as f:
        assert {**yaml.safe_load(f), "out": flag_run} == saved


def test_resume_names_the_settings_that_differ(tiny, flag_run, tmp_path, capsys):
    model_dir, data = tiny
    out = str(tmp_path / "copy")
    import shutil

    shutil.copytree(flag_run, out)
    argv = ["finetune", "--model", model_dir, "--data", data, "--out", out, *FLAGS]
    changed = [*argv, "--lr", "1e-3", "--lora-r", "8", "--resume", "--steps", "4"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "cannot resume with different settings" in err
    assert "lr: 0.005 -> 0.001" in err and "lora_r: 4 -> 8" in err and "steps" not in err


def test_finetune_takes_an_optax_optimizer(tiny, flag_run, tmp_path):
    """The optimizer ``config.optim`` describes, given as an optax optimizer instead: the
    same adapter, bit for bit; metrics.jsonl then logs no learning rate."""
    from jqlora.app.loop import finetune
    from jqlora.train.schedules import make_schedule
    from jqlora.train.step import make_optimizer

    model_dir, data = tiny
    config = parse("--model", model_dir, "--data", data, "--out", str(tmp_path / "o"), *FLAGS)
    config = config.replace(progress=False, sample=False)
    optimizer = make_optimizer(make_schedule("constant_with_warmup", 5e-3, 0, 1), max_grad_norm=0.3)
    result = finetune(config, optimizer, log=lambda *a: None)
    assert _adapter(result.out) == _adapter(flag_run)
    with open(os.path.join(result.out, "metrics.jsonl")) as f:
        assert all("lr" not in json.loads(line) for line in f)
