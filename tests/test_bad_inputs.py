"""Bad input, and the error each one gets (asserted on the message), plus the safety rules.

Covered elsewhere, not repeated here:
- unknown flags and TOML keys refused with the nearest valid name, bad values naming the flag,
  a missing --config file: tests/test_config.py (test_unknown_flag_suggests_the_nearest,
  test_toml_unknown_key_and_wrong_type_are_refused, test_bad_values_are_refused_with_the_flag_name);
- NaN rewards counted (advantage 0) and a run whose every reward is NaN stopping, a NaN loss
  skipped and K in a row stopping GRPO: tests/test_grpo_trainer.py (test_some_nan_rewards_...,
  test_all_rewards_nan_stops_..., test_nan_loss_step_is_skipped_and_counted,
  test_consecutive_nan_losses_stop_the_run);
- malformed rows of every source format in detail: tests/test_data_loaders.py.

Here: each kind of bad input once more at the level the user meets it (the trainer or its
command line), the infinite rewards, SFT's NaN losses, a checkpoint of another model, the tool
schema check, and safety: safetensors only, optimizer state loaded with weights_only=True,
trust_remote_code off unless asked, model output parsed as JSON only (and no eval/exec/pickle
anywhere in the package code).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

import grpo.prompts as prompts_mod
import grpo.run as run_mod
import grpo.step as step_mod
import grpo.trainer as grpo_trainer
import sft.data as sft_data
import sft.loss as sft_loss
import sft.trainer as sft_trainer
from grpo.config import parse_config
from grpo.policy import LoraSettings, load_policy, load_tokenizer, save_base_model
from grpo.tiny import build_tiny_model
from rewards.score import RewardResult
from tests.conftest import TRAINER_TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
TINY = TRAINER_TINY_MODEL  # the model of the tiny_base fixture


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return load_tokenizer(tiny_base)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, tokenizer) -> Path:
    """Another model with the same tokenizer: hidden size 16 instead of 32."""
    other = dataclasses.replace(TINY, hidden_size=16, intermediate_size=32)
    return save_base_model(build_tiny_model(tokenizer, other, seed=1), tokenizer,
                           tmp_path_factory.getbasetemp() / "tiny-base-512-hidden16")


def quiet(message: str) -> None:
    pass


def grpo_config(tiny_base: Path, data: Path | str, out: Path, **overrides) -> grpo_trainer.GRPOConfig:
    values = dict(model=str(tiny_base), data=str(data), out=str(out), group_size=2, prompts_per_step=2,
                  rollout_batch_prompts=2, max_new_tokens=4, lora_r=4, lora_alpha=8, similarity="lexical",
                  save_every=0, sample_every=0, max_steps=1, device="cpu")
    values.update(overrides)
    return grpo_trainer.GRPOConfig(**values)


def write_rows(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def apigen_row(tools="[]", turns=None) -> dict:
    turns = turns if turns is not None else [{"from": "human", "value": "Where is my order?"},
                                             {"from": "gpt", "value": "Which order number?"}]
    return {"system": "You are a support agent.", "tools": tools, "conversations": turns}


# ---------------------------------------------------------------------------------------------
# Files, formats and rows
# ---------------------------------------------------------------------------------------------


def test_missing_data_file_stops_with_the_path(tmp_path, tiny_base, tokenizer):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(SystemExit, match=re.escape(f"--data {missing}: {missing}: no such file")):
        prompts_mod.build_prompts(grpo_config(tiny_base, missing, tmp_path), tokenizer, quiet)
    config = sft_trainer.SFTConfig(model=str(tiny_base), data=str(missing), out=str(tmp_path / "sft"), max_steps=1)
    with pytest.raises(SystemExit, match=re.escape(f"--data {missing}: {missing}: no such file")):
        sft_trainer.train(config)


def test_missing_model_and_checkpoint_stop_naming_the_flag(tmp_path, small_data):
    with pytest.raises(SystemExit, match=r"--model .*nowhere-model: could not load a causal LM from"):
        run_mod.load_start_policy(grpo_config(tmp_path / "nowhere-model", small_data / "train.json", tmp_path),
                                       torch.device("cpu"), torch.float32, quiet)
    config = grpo_config(tmp_path, small_data / "train.json", tmp_path, model=None, init=str(tmp_path / "no-ckpt"))
    with pytest.raises(SystemExit, match=r"--init .*no-ckpt: .*not a policy checkpoint: lineage.json is missing"):
        run_mod.load_start_policy(config, torch.device("cpu"), torch.float32, quiet)


def test_unknown_data_format_is_refused_by_the_parser(capsys):
    for cls in (grpo_trainer.GRPOConfig, sft_trainer.SFTConfig):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(cls, ["--data-format", "xml"])
        assert exit_info.value.code == 2
        assert "argument --data-format: invalid choice: 'xml' (choose from 'apigen', 'tau', 'almita')" in capsys.readouterr().err


@pytest.mark.parametrize("rows, data_format, expected", [
    ([{"system": "s", "tools": "[]"}], "apigen", "row 0: field 'conversations': expected a non-empty list"),
    ([apigen_row(turns=[{"value": "hi"}])], "apigen", "row 0: field 'conversations[0].from': unknown speaker None"),
    ([{"task_id": 1, "reward": 1.0}], "tau", "row 0: field 'messages': expected a non-empty list of messages"),
])
def test_rows_with_missing_fields_name_the_row_and_field(tmp_path, tiny_base, tokenizer, rows, data_format, expected):
    path = write_rows(tmp_path / "bad.json", rows)
    with pytest.raises(SystemExit, match=re.escape(expected)):
        prompts_mod.build_prompts(grpo_config(tiny_base, path, tmp_path, data_format=data_format), tokenizer, quiet)


def test_csv_without_a_required_column_lists_expected_and_found(tmp_path, tiny_base, tokenizer):
    path = tmp_path / "bad.csv"
    path.write_text("conversation_id,speaker\n1,user\n")
    with pytest.raises(SystemExit, match=r"CSV header lacks content\. Expected columns -> .* Found columns: "
                                         r"conversation_id, speaker"):
        prompts_mod.build_prompts(grpo_config(tiny_base, path, tmp_path, data_format="almita"), tokenizer, quiet)


@pytest.mark.parametrize("tools, expected", [
    ("[{not json", "field 'tools': not valid JSON"),
    ('[{"description": "no name"}]', "field 'tools[0]': tool definition without a string 'name'"),
    ('[{"name": "find", "parameters": "a string"}]',
     "field 'tools[0].parameters': tool 'find': parameters must be a JSON schema object, got str"),
    ('[{"name": "find", "parameters": {"type": "object", "properties": {"id": "string"}}}]',
     "field 'tools[0].parameters': tool 'find': property 'id' must be a schema object, got str"),
    ('[{"name": "find", "parameters": {"type": "object", "properties": [], "required": []}}]',
     "field 'tools[0].parameters': tool 'find': parameters 'properties' must be an object, got list"),
    ('[{"name": "find", "parameters": {"type": ["object"]}}]',
     "field 'tools[0].parameters': tool 'find': parameters 'type' must be a string"),
    ('[{"name": "find", "parameters": {"properties": {}, "required": "id"}}]',
     "field 'tools[0].parameters': tool 'find': parameters 'required' must be a list of names, got 'id'"),
])
def test_tools_that_are_not_json_schemas_are_refused(tmp_path, tools, expected):
    from data.loaders import DataError, load_conversations

    path = write_rows(tmp_path / "bad.json", [apigen_row(tools=tools)])
    with pytest.raises(DataError, match=re.escape(f"{path}: row 0: {expected}")):
        load_conversations(path, format="apigen")


def test_a_usable_tool_schema_and_no_parameters_are_accepted(tmp_path):
    from data.loaders import load_conversations
    from data.rows import parameters_schema_problem

    tools = json.dumps([{"name": "find", "parameters": {"type": "object", "properties": {"id": {"type": "string"}},
                                                          "required": ["id"]}},
                        {"name": "ping"}])
    conversations, _ = load_conversations(write_rows(tmp_path / "ok.json", [apigen_row(tools=tools)]), format="apigen")
    assert [tool["function"]["name"] for tool in conversations[0].tools] == ["find", "ping"]
    assert parameters_schema_problem(None) is None and parameters_schema_problem({}) is None


def test_conversations_without_an_assistant_turn_are_counted_and_none_at_all_stops(tmp_path, tiny_base, tokenizer,
                                                                                    small_data):
    no_action = apigen_row(turns=[{"from": "human", "value": "Hello?"}])
    only_bad = write_rows(tmp_path / "none.json", [no_action, no_action])
    with pytest.raises(SystemExit, match="no usable prompts \\(no conversation has an assistant action\\)"):
        prompts_mod.build_prompts(grpo_config(tiny_base, only_bad, tmp_path), tokenizer, quiet)

    rows = json.loads((small_data / "train.json").read_text())[:2] + [no_action]
    messages = []
    prompts = prompts_mod.build_prompts(grpo_config(tiny_base, write_rows(tmp_path / "mixed.json", rows), tmp_path),
                                         tokenizer, messages.append)
    assert prompts and "3 conversations (1 without an assistant action)" in messages[-1]

    config = sft_trainer.SFTConfig(data=str(only_bad), val_fraction=0.0)
    with pytest.raises(SystemExit, match="no training samples for stage 'base'"):
        sft_data.prepare_data(config, tokenizer, quiet)


def test_contexts_over_the_length_limit_are_skipped_and_counted(tmp_path, tiny_base, tokenizer, small_data):
    rows = json.loads((small_data / "train.json").read_text())[:2]
    huge = apigen_row(turns=[{"from": "human", "value": "please " * 3000}, {"from": "gpt", "value": "No."}])
    path = write_rows(tmp_path / "long.json", rows + [huge])
    messages = []
    prompts = prompts_mod.build_prompts(grpo_config(tiny_base, path, tmp_path), tokenizer, messages.append)
    samples = int(re.search(r"(\d+) samples", messages[-1]).group(1))
    assert "1 skipped as too long even after dropping history" in messages[-1]
    assert len(prompts) == samples - 1 and all(len(p.prompt_ids) <= 1024 for p in prompts)
    assert any("prompt of" in message and "> max_length 1024" in message for message in messages)
    with pytest.raises(SystemExit, match="no usable prompts \\(all 1 exceed --max-prompt-length 1024\\)"):
        prompts_mod.build_prompts(grpo_config(tiny_base, write_rows(tmp_path / "one.json", [huge]), tmp_path),
                                   tokenizer, quiet)

    stats = sft_data.prepare_data(sft_trainer.SFTConfig(data=str(path), val_fraction=0.0), tokenizer, quiet).stats
    assert stats["train_too_long"] == 1


def test_unknown_sft_flag_suggests_the_nearest(capsys):
    import sft.train

    with pytest.raises(SystemExit) as exit_info:
        sft.train.main(["--grad-acum", "2"])
    assert exit_info.value.code == 2
    assert "--grad-acum (did you mean '--grad-accum'?)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A checkpoint of another model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, tiny_base, small_data) -> Path:
    out = tmp_path_factory.mktemp("one-step")
    grpo_trainer.train(grpo_config(tiny_base, small_data / "train.json", out), reward_fn=scripted_rewards)
    return out


def scripted_rewards(texts, targets):
    return [RewardResult(total=float(len(text) % 3), components={}, success=False, kind="answer") for text in texts]


def test_resume_from_another_base_model_is_refused_naming_both(one_step_run, tiny_base, other_base, small_data):
    config = grpo_config(other_base, small_data / "train.json", one_step_run, max_steps=2, resume=True)
    with pytest.raises(SystemExit, match=re.escape(f"was trained with model={str(tiny_base)!r}, but this run has "
                                                   f"model={str(other_base)!r}")):
        grpo_trainer.train(config, reward_fn=scripted_rewards)
    config = grpo_config(tiny_base, small_data / "train.json", one_step_run, max_steps=2, resume=True, lora_r=8)
    with pytest.raises(SystemExit, match="trained with lora_r=4, but this run has lora_r=8"):
        grpo_trainer.train(config, reward_fn=scripted_rewards)


def test_checkpoint_lineage_and_architecture_are_compared(one_step_run, tiny_base, other_base, tmp_path):
    from grpo.checkpoint import check_resume_compatible, latest_checkpoint, save_training_checkpoint

    checkpoint = latest_checkpoint(one_step_run)
    config = grpo_config(tiny_base, "x", tmp_path)
    policy = load_policy(base=str(tiny_base), lora=LoraSettings(r=4, alpha=8))
    check_resume_compatible(checkpoint, config, policy)  # the same starting point: accepted
    moved = dataclasses.replace(policy, lineage={"base": str(other_base), "adapters": []})
    with pytest.raises(SystemExit, match=re.escape(f"continues base model {str(tiny_base.resolve())!r} (adapters [])"
                                                   f", but this run starts from {str(other_base)!r}")):
        check_resume_compatible(checkpoint, config, moved)

    # Full fine-tuning: the saved model's architecture against the model being trained.
    full = load_policy(base=str(tiny_base), lora=None)
    optimizer = torch.optim.AdamW([p for p in full.model.parameters() if p.requires_grad])
    full_config = dataclasses.replace(config, lora=False)
    saved = save_training_checkpoint(tmp_path / "full", 1, policy=full, optimizer=optimizer, config=full_config)
    smaller = load_policy(base=str(other_base), lora=None)
    with pytest.raises(SystemExit, match=r"step-000001/model is a different model \(hidden_size=32, intermediate_size=64\) from "
                                         r".* \(hidden_size=16, intermediate_size=32\)"):
        check_resume_compatible(saved, full_config, smaller)


# ---------------------------------------------------------------------------------------------
# Infinite rewards; SFT's NaN losses
# ---------------------------------------------------------------------------------------------


def test_infinite_rewards_are_counted_and_get_advantage_zero(tmp_path, tiny_base, small_data):
    policy = load_policy(base=str(tiny_base), lora=LoraSettings(r=4, alpha=8))
    config = grpo_config(tiny_base, small_data / "train.json", tmp_path, group_size=4, max_new_tokens=3)
    prompts = prompts_mod.build_prompts(config, policy.tokenizer, quiet)[:2]
    totals = [math.inf, 1.0, 2.0, 3.0, -math.inf, math.nan, 0.5, 0.5]

    def reward_fn(texts, targets):
        return [RewardResult(total=value, components={}, success=False, kind="answer") for value in totals]

    batches, rewards, metrics, _ = step_mod.rollout_and_score(
        policy, prompts, config, step=0, reward_fn=reward_fn, device=torch.device("cpu"))
    advantages = torch.cat([batch.advantages for batch in batches])
    # Group 1: inf unscored (0); the rest (1, 2, 3) has mean 2 and std 1.  Group 2: two equal scored rewards.
    expected = torch.tensor([0.0, -1.0, 0.0, 1.0]) / (1.0 + 1e-4)
    torch.testing.assert_close(advantages, torch.cat([expected, torch.zeros(4)]))
    assert metrics["reward/unscored_count"] == 3
    assert metrics["reward/mean"] == pytest.approx(7.0 / 5.0)


class PoisonedNll:
    """sft.loss.masked_nll_sum returning NaN during the given (1-based) optimizer steps."""

    def __init__(self, steps: set[int], micro_per_step: int) -> None:
        self.steps, self.micro_per_step, self.calls = steps, micro_per_step, 0
        self.original = sft_loss.masked_nll_sum

    def __call__(self, model, batch):
        nll, count = self.original(model, batch)
        self.calls += 1
        step = (self.calls - 1) // self.micro_per_step + 1
        return (nll * math.nan if step in self.steps and torch.is_grad_enabled() else nll), count


def sft_config(tiny_base: Path, small_data: Path, out: Path, **overrides) -> sft_trainer.SFTConfig:
    values = dict(model=str(tiny_base), data=str(small_data / "train.json"), out=str(out), lora_r=4, lora_alpha=8,
                  micro_batch=2, grad_accum=2, max_steps=4, lr=1e-2, warmup_steps=0, eval_every=0, val_fraction=0.0,
                  log_every=1, max_samples=8, device="cpu")
    values.update(overrides)
    return sft_trainer.SFTConfig(**values)


def test_sft_nan_loss_skips_the_step_and_k_in_a_row_stop(tmp_path, tiny_base, small_data, monkeypatch):
    monkeypatch.setattr(sft_loss, "masked_nll_sum", PoisonedNll({2}, micro_per_step=2))
    out = tmp_path / "skip"
    sft_trainer.train(sft_config(tiny_base, small_data, out))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 1]
    assert math.isnan(metrics[1]["grad_norm"]) and all(math.isfinite(m["loss"]) for m in metrics)
    assert "step 2: non-finite loss nan or gradient norm nan, step skipped (1 in a row)" in (out / "log.txt").read_text()

    monkeypatch.setattr(sft_loss, "masked_nll_sum", PoisonedNll({1, 2, 3, 4}, micro_per_step=2))
    with pytest.raises(SystemExit, match="stopping: 2 consecutive steps with a non-finite loss or gradient "
                                         "\\(--max-bad-steps 2\\)"):
        sft_trainer.train(sft_config(tiny_base, small_data, tmp_path / "stop", max_bad_steps=2))


# ---------------------------------------------------------------------------------------------
# Safety
# ---------------------------------------------------------------------------------------------


def test_weights_are_read_only_from_safetensors(tmp_path, tiny_base, small_data):
    from transformers import AutoConfig

    pickled = tmp_path / "pickled-model"
    pickled.mkdir()
    AutoConfig.from_pretrained(tiny_base).save_pretrained(pickled)
    load_tokenizer(tiny_base).save_pretrained(pickled)
    state = build_tiny_model(load_tokenizer(tiny_base), TINY).state_dict()
    torch.save(state, pickled / "pytorch_model.bin")  # a pickle: never loaded
    with pytest.raises(SystemExit, match=r"--model .*pickled-model: could not load a causal LM .*safetensors"):
        run_mod.load_start_policy(grpo_config(pickled, small_data / "train.json", tmp_path),
                                       torch.device("cpu"), torch.float32, quiet)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_trainer_state_is_loaded_with_weights_only(tmp_path):
    from grpo.checkpoint import STATE_FILE, load_trainer_state

    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "optimizer": _Payload(marker)}, tmp_path / STATE_FILE)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_trainer_state(tmp_path)
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_the_flag_is_given(tmp_path, monkeypatch):
    seen = []

    def record(**kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise ValueError("stop here")

    import grpo.run

    monkeypatch.setattr(grpo.run, "load_policy", record)  # sft uses grpo.run.load_start_policy too
    for cls in (grpo_trainer.GRPOConfig, sft_trainer.SFTConfig):  # both trainers start through grpo.run
        for argv in ([], ["--trust-remote-code"]):
            config = parse_config(cls, ["--model", "some/model", "--out", str(tmp_path), *argv])
            with pytest.raises(SystemExit, match="stop here"):
                run_mod.load_start_policy(config, torch.device("cpu"), torch.float32, quiet)
    assert seen == [False, True, False, True]


def test_tool_call_text_is_only_parsed_as_json(tmp_path):
    from rewards.parse import parse

    marker = tmp_path / "code-ran"
    for body in (f"__import__('pathlib').Path({str(marker)!r}).touch()",
                 f'{{"name": "x", "arguments": __import__("pathlib").Path({str(marker)!r}).touch()}}',
                 '{"name": "x", "arguments": {"a": NaN}}'):
        parsed = parse(f"<think>\n\n</think>\n\n<tool_call>\n{body}\n</tool_call>")
        assert parsed.kind == "invalid" and parsed.call is None, body
    assert not marker.exists()
    assert parse('<think>\n\n</think>\n\n<tool_call>\n{"name": "x", "arguments": {"a": 1}}\n</tool_call>').call == {
        "name": "x", "arguments": {"a": 1}}


def test_package_code_never_evaluates_or_unpickles():
    """No eval/exec/pickle/weights_only=False/trust_remote_code=True in the package code."""
    allowed: set = set()
    pattern = re.compile(r"(?<![\w.])(eval|exec)\(|\bpickle\b|weights_only\s*=\s*False|trust_remote_code\s*=\s*True")
    found = []
    for package in ("data", "rewards", "grpo", "sft", "eval"):
        for path in sorted((REPO / package).rglob("*.py")):
            for line in path.read_text().splitlines():
                code = line.split("#")[0].strip()
                if pattern.search(code) and (str(path.relative_to(REPO)), code) not in allowed:
                    found.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert found == []
