"""Tests for grpo.config and the command lines built on it (`python -m grpo.train`, `sft.train`).

Flags come from the flat config dataclasses: every field is a `--flag` whose help shows its
default; `--config FILE.toml` loads many at once and flags given on the command line win; unknown
names (flags or TOML keys) and bad values are refused with a message that names them.
"""

from __future__ import annotations

import dataclasses

import pytest

import eval.run
import grpo.pipeline
import grpo.train
import sft.train
from eval.run import EvalConfig
from grpo.config import ConfigError, config_from_dict, load_toml, parse_config
from grpo.pipeline import PipelineConfig
from grpo.trainer import GRPOConfig
from sft.trainer import SFTConfig


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("entry_point, cls", [(grpo.train.main, GRPOConfig), (grpo.train.main, PipelineConfig),
                                              (grpo.pipeline.main, PipelineConfig), (sft.train.main, SFTConfig),
                                              (eval.run.main, EvalConfig)])
def test_help_lists_every_field_with_its_default(entry_point, cls, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps help at the terminal width
    with pytest.raises(SystemExit) as exit_info:
        entry_point(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(cls):
        assert flag_of(field.name) in text, field.name
        assert f"(default: {field.default!r}" in text, field.name
    assert "--config FILE.toml" in text
    if entry_point is grpo.train.main:  # the GRPO flags and the pipeline's, in one --help
        assert "--preset" in text and "--skip-eval" in text and "--prompts-per-step" in text
    if cls is GRPOConfig:
        assert "one of grpo, bnpo, dr_grpo, dapo" in text  # choices are shown, not only STR
        for name in ("out", "max_steps", "save_every", "seed", "resume", "init", "model"):  # names the issue fixes
            assert flag_of(name) in text


def test_unknown_flag_suggests_the_nearest(capsys):
    with pytest.raises(SystemExit) as exit_info:
        grpo.train.main(["--model", "tiny", "--max-step", "3"])
    assert exit_info.value.code == 2
    assert "--max-step (did you mean '--max-steps'?)" in capsys.readouterr().err


def test_bad_values_are_refused_with_the_flag_name(capsys):
    for argv, expected in [
        (["--max-steps", "three"], "--max-steps: cannot read 'three' as int"),
        (["--loss-type", "ppo"], "invalid choice: 'ppo'"),
        (["--group-size", "1"], "--group-size must be >= 2"),
        (["--train-micro-batch", "0"], "--train-micro-batch must be >= 1"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--lr", "-1"], "--lr must be >= 0"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_config(GRPOConfig, argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        parse_config(SFTConfig, ["--grad-accum", "0"])
    assert "--grad-accum must be >= 1" in capsys.readouterr().err


def test_flags_parse_to_typed_values():
    config = parse_config(GRPOConfig, ["--model", "tiny", "--beta", "0.1", "--no-lora", "--epsilon-high", "none",
                                       "--max-steps=7", "--deterministic"])
    assert (config.model, config.beta, config.lora, config.epsilon_high, config.max_steps, config.deterministic) == (
        "tiny", 0.1, False, None, 7, True)
    assert parse_config(GRPOConfig, []) == GRPOConfig()


def test_toml_loads_values_and_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "tiny"\nmax-steps = 7\nbeta = 1\nlora = false\nloss_type = "dapo"\n')
    config = parse_config(GRPOConfig, ["--config", str(path), "--max-steps", "9"])
    assert config.max_steps == 9  # the flag wins
    assert (config.model, config.beta, config.lora, config.loss_type) == ("tiny", 1.0, False, "dapo")
    assert isinstance(config.beta, float)  # TOML int for a float field
    # A flag that is not given does not reset a value from the file.
    assert parse_config(GRPOConfig, ["--config", str(path)]).max_steps == 7
    assert parse_config(GRPOConfig, ["--config", str(path), "--lora"]).lora is True


def test_toml_unknown_key_and_wrong_type_are_refused(tmp_path, capsys):
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("max_step = 7\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_step' \\(did you mean 'max_steps'\\?\\)"):
        load_toml(GRPOConfig, unknown)
    with pytest.raises(SystemExit):
        parse_config(GRPOConfig, ["--config", str(unknown)])
    assert "did you mean 'max_steps'" in capsys.readouterr().err

    wrong = tmp_path / "wrong.toml"
    wrong.write_text('max_steps = "many"\n')
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        load_toml(GRPOConfig, wrong)
    bad_choice = tmp_path / "choice.toml"
    bad_choice.write_text('loss_type = "ppo"\n')
    with pytest.raises(ConfigError, match="not one of"):
        load_toml(GRPOConfig, bad_choice)
    with pytest.raises(ConfigError, match="no such file"):
        load_toml(GRPOConfig, tmp_path / "missing.toml")


def test_config_file_that_names_the_model_runs_grpo_not_the_pipeline(tmp_path, monkeypatch):
    """`python -m grpo.train --config run.toml` (the docstring's example) with `model` or `init`
    in the file must start GRPO alone, exactly as `--model` on the command line does."""
    seen = []
    monkeypatch.setattr(grpo.train, "train", lambda config: seen.append(config) or tmp_path)
    path = tmp_path / "run.toml"
    path.write_text('init = "runs/coldstart/checkpoints/step-000090"\nmax_steps = 4\n')
    grpo.train.main(["--config", str(path), "--resume"])
    assert len(seen) == 1
    assert (seen[0].init, seen[0].max_steps, seen[0].resume) == ("runs/coldstart/checkpoints/step-000090", 4, True)


def test_config_from_dict_round_trip():
    config = GRPOConfig(model="tiny", beta=0.2)
    assert config_from_dict(GRPOConfig, dataclasses.asdict(config)) == config
    assert config_from_dict(GRPOConfig, {**dataclasses.asdict(config), "removed_field": 1}) == config
    with pytest.raises(ConfigError, match="removed_field"):
        config_from_dict(GRPOConfig, {"removed_field": 1}, strict=True)


def test_config_files_on_python_3_10_use_tomli(monkeypatch, tmp_path):
    """Python 3.10 has no tomllib: grpo.config falls back to the tomli package (a dependency there)."""
    import sys
    import types

    import grpo.config

    fake_tomli = types.ModuleType("tomli")
    fake_tomli.TOMLDecodeError = ValueError
    fake_tomli.load = lambda handle: {"max_steps": 7}
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib -> ImportError, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", fake_tomli)
    assert grpo.config.toml_parser() is fake_tomli
    monkeypatch.setattr(grpo.config, "tomllib", fake_tomli)
    path = tmp_path / "run.toml"
    path.write_text("max_steps = 7\n")
    assert parse_config(GRPOConfig, ["--config", str(path)]).max_steps == 7
    monkeypatch.setitem(sys.modules, "tomli", None)  # neither parser: a clear error, not a crash
    assert grpo.config.toml_parser() is None
    monkeypatch.setattr(grpo.config, "tomllib", None)
    with pytest.raises(ConfigError, match="pip install tomli"):
        load_toml(GRPOConfig, path)
