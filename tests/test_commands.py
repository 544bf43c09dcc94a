"""Every `zoo` command is listed by `zoo --help`, answers `--help` at once, and takes one flag style."""

from __future__ import annotations

import signal
import time

import pytest

from launch.cli import COMMANDS, command_summary, main

# `--help` parses and prints; a command that instead starts its work (benchmarks, training)
# is cut off here and fails, instead of running for minutes
HELP_SECONDS = 30


class _TookTooLong(Exception):
    pass


def _alarm(signum, frame):
    raise _TookTooLong(f"`--help` still running after {HELP_SECONDS} s: the command ran instead of printing usage")


def test_zoo_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    for name in COMMANDS:
        assert name in listed, out
        assert command_summary(name) and command_summary(name) in listed[name]
    assert "--verbose" in out


def test_no_command_prints_the_usage_and_an_unknown_one_names_the_choices(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'trian'" in err and "fit" in err


def test_a_command_without_its_own_line_shows_its_docstring(monkeypatch):
    monkeypatch.setitem(COMMANDS, "export2", "launch.export:main")
    assert command_summary("export2") == "Write a checkpoint's weights as .safetensors with its data config and class names."


def _import_target(command: str) -> None:
    """Import the command's modules first: the time limit is for the command, not for importing torch."""
    import importlib

    from launch.cli import LIGHTNING, command_target

    target = command_target(command)
    modules = ["launch.zoo_cli", "zoo.base", "datamodules.imagenet"] if target == LIGHTNING else [target.split(":")[0]]
    for m in modules:
        importlib.import_module(m)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_answers_help_at_once(command, capsys):
    _import_target(command)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HELP_SECONDS)
    t0 = time.perf_counter()
    try:
        rc = main([command, "--help"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "usage:" in out and ("--help" in out or "-h" in out), out
    if command not in ("fit", "validate", "test", "predict"):
        assert f"usage: zoo {command}" in out
    assert time.perf_counter() - t0 < HELP_SECONDS


def test_fit_help_shows_the_class_defaults_not_the_demo_recipe(capsys):
    _import_target("fit")
    assert main(["fit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # demo.yaml sets lr_reference_batch: null; ImageClassifier's default is 256 (Goyal et al.)
    start = out.index("--model.lr_reference_batch LR_REFERENCE_BATCH (type")
    assert "default: 256" in out[start:start + 120]
    assert "no --config given" not in out


def test_sweep_does_not_offer_its_internal_verbs(capsys):
    assert main(["sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "_train" not in out and "worker" not in out
    assert main(["sweep", "_train", "a", "b"]) == 2  # a spec named `_train`, not a trial process


def test_old_flag_spellings_work_for_one_release_with_one_line_each(tmp_path, capsys):
    rc = main(["landscape", str(tmp_path / "missing.ckpt"), "--batch-size", "3", "--out", str(tmp_path),
               "--no-wandb"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--batch-size is deprecated, use --data.batch_size" in err
    assert "--out is deprecated, use --out_dir" in err
    assert "--no-wandb is deprecated, use --wandb false" in err
    assert "missing.ckpt not found" in err


def test_booleans_take_true_or_false():
    from launch.flags import deprecated, parse_bool

    assert [parse_bool(v) for v in ("true", "False", "1", "no")] == [True, False, True, False]
    with pytest.raises(Exception):
        parse_bool("maybe")
    assert deprecated(["--no-ema", "--out=x", "a"], {"--no-ema": ("--ema", "false"), "--out": ("--out_dir",)},
                      "zoo t") == ["--ema", "false", "--out_dir=x", "a"]


def test_a_command_error_still_prints_its_line(capsys):
    assert main(["gradcheck", "mlp", "--model.arch_args", "{not json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --model.arch_args is not JSON") and err.count("\n") == 1
