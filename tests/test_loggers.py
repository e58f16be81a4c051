"""TensorBoard and W&B loggers: event files read back by TensorBoard's own reader, a W&B run
in offline mode, and a clear message when a logger's package is missing."""

import glob
import sys
import time

import pytest

from jqlora.app.loggers import TAGS, make_loggers, parse_report_to

LINES = [
    {"step": 0, "eval_loss": 3.0},
    {"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.7, "tokens_per_s": 100.0, "tokens": 40},
    {
        "step": 2,
        "loss": 2.25,
        "lr": 2e-4,
        "grad_norm": 0.5,
        "tokens_per_s": 120.0,
        "eval_loss": 2.0,
    },
]


def _log(loggers):
    for line in LINES:
        loggers.log(line["step"], line)
    loggers.close()


def test_tensorboard_events_read_back_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(make_loggers("tensorboard", str(tmp_path), {}))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(TAGS.values())
    read = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in TAGS.values()}
    assert read["train/loss"] == [(1, 2.5), (2, 2.25)]
    assert read["eval/loss"] == [(0, 3.0), (2, 2.0)]
    assert read["train/learning_rate"] == [(1, pytest.approx(1e-4)), (2, pytest.approx(2e-4))]
    assert read["train/grad_norm"] == [(1, pytest.approx(0.7)), (2, 0.5)]
    assert read["train/tokens_per_second"] == [(1, 100.0), (2, 120.0)]


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = make_loggers("wandb", str(tmp_path), {"lr": 2e-4, "optimizer": "adamw_8bit"})
    for line in LINES:
        loggers.log(line["step"], line)
    run = loggers.loggers[0]._run
    assert run.summary["train/loss"] == 2.25 and run.summary["eval/loss"] == 2.0
    assert run.config["optimizer"] == "adamw_8bit"
    loggers.close()
    # The offline run's record log (protobuf records; `wandb sync` uploads it) holds them.
    # W&B's service process may still be writing it when finish() returns.
    (log,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    for _ in range(100):
        raw = open(log, "rb").read()
        if all(tag.encode() in raw for tag in TAGS.values()) and b"adamw_8bit" in raw:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{log} lacks some of {list(TAGS.values())}")


@pytest.mark.parametrize("name,module", [("tensorboard", "tensorboardX"), ("wandb", "wandb")])
def test_missing_package_says_how_to_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(
        ImportError,
        match=rf"--report-to {name} needs the '{module}' package.*pip install 'jqlora\[",
    ):
        make_loggers(name, str(tmp_path), {})


def test_report_to_parsing():
    assert parse_report_to("none") == ()
    assert parse_report_to("tensorboard,wandb") == ("tensorboard", "wandb")
    assert parse_report_to(["wandb"]) == ("wandb",)
    with pytest.raises(ValueError, match="unknown 'mlflow'"):
        parse_report_to("mlflow")
    with pytest.raises(ValueError, match="none cannot be combined"):
        parse_report_to("none,wandb")
    assert make_loggers("none", "/nonexistent", {}).loggers == []
