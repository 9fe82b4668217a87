"""Checkpoints that leave their run directory: moved whole (relative lineage), or exported.

1. `save_policy` stores the parents of a chain of stages relative to the checkpoint, so a run
   directory moved to another name still loads, and a missing parent fails with a message naming
   the lineage file and the missing path.
2. `grpo.export` merges a checkpoint's chain into one plain Hugging Face folder that transformers
   loads alone, with the log-probs of the merged policy.

Every test uses the trainer tests' tiny model (tests/conftest.py) and one CPU thread.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from grpo.checkpoint import save_trainer_state, write_checkpoint
from grpo.export import EXPORT_RECORD, export_checkpoint, main, save_plain_model
from grpo.policy import (
    LoraSettings,
    Policy,
    load_base_model,
    load_policy,
    read_lineage,
    save_base_model,
    save_policy,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL_LORA = LoraSettings(r=4, alpha=8)
CHAT_TEMPLATE = "{% for message in messages %}<|im_start|>{{ message['content'] }}<|im_end|>{% endfor %}"
COLDSTART = Path("coldstart") / "checkpoints" / "step-000001"
GRPO = Path("grpo") / "checkpoints" / "step-000002"


def train_stand_in(policy: Policy, seed: int) -> None:
    """Stand-in for training: random LoRA B (A is already random), so the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.3, generator=generator)


def sequence_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (3, 12), generator=torch.Generator().manual_seed(5))


def sequence_logprobs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1, computed from the model's own logits (no project code)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def write_stage(run: Path, policy: Policy, step: int) -> Path:
    """A checkpoint as the trainers write it: a temporary sibling directory, renamed into place."""

    def write(directory: Path) -> None:
        save_policy(policy, directory)
        save_trainer_state(directory, {"step": step})

    return write_checkpoint(run, step, write)


@pytest.fixture(scope="module")
def chain_template(tmp_path_factory, tiny_base) -> Path:
    """RUN/base (a full model), RUN/coldstart (LoRA stage A on the base) and RUN/grpo (LoRA stage
    B on A merged), laid out like a pipeline run; tests copy it before changing it."""
    run = tmp_path_factory.mktemp("chain") / "run"
    model, tokenizer = load_base_model(str(tiny_base))
    tokenizer.chat_template = CHAT_TEMPLATE  # later stages take the tokenizer of the checkpoint they start from
    save_base_model(model, tokenizer, run / "base")

    stage_a = load_policy(base=str(run / "base"), lora=SMALL_LORA)
    train_stand_in(stage_a, seed=1)
    assert write_stage(run / "coldstart", stage_a, step=1) == run / COLDSTART
    stage_b = load_policy(init=run / COLDSTART, lora=SMALL_LORA)
    train_stand_in(stage_b, seed=2)
    assert write_stage(run / "grpo", stage_b, step=2) == run / GRPO
    return run


@pytest.fixture()
def run_dir(tmp_path, chain_template) -> Path:
    return Path(shutil.copytree(chain_template, tmp_path / "run"))


@pytest.fixture(scope="module")
def ids(tiny_base) -> torch.Tensor:
    return sequence_ids(json.loads((tiny_base / "config.json").read_text())["vocab_size"])


# ----------------------------------------------------------------------------------------------
# Relative lineage: a run directory can move
# ----------------------------------------------------------------------------------------------


def test_lineage_stores_parents_relative_to_the_checkpoint(run_dir):
    assert json.loads((run_dir / COLDSTART / "lineage.json").read_text()) == {
        "base": "../../../base", "adapters": ["adapter"]}
    assert json.loads((run_dir / GRPO / "lineage.json").read_text()) == {
        "base": "../../../base", "adapters": ["../../../coldstart/checkpoints/step-000001/adapter", "adapter"]}
    assert read_lineage(run_dir / GRPO) == {
        "base": str((run_dir / "base").resolve()),
        "adapters": [str((run_dir / COLDSTART / "adapter").resolve()), str((run_dir / GRPO / "adapter").resolve())]}


def test_moved_run_directory_loads_with_the_same_logits(run_dir, ids):
    before = sequence_logprobs(load_policy(init=run_dir / GRPO, lora=None).model, ids)
    moved = run_dir.parent / "renamed-run"
    shutil.move(str(run_dir), str(moved))
    assert not run_dir.exists()

    policy = load_policy(init=moved / GRPO, lora=None)
    assert policy.lineage["adapters"][0] == str((moved / COLDSTART / "adapter").resolve())
    torch.testing.assert_close(sequence_logprobs(policy.model, ids), before, rtol=0, atol=0)


@pytest.mark.parametrize("parent, entry", [("coldstart", "../../../coldstart/checkpoints/step-000001/adapter"),
                                           ("base", "../../../base")])
def test_missing_parent_names_the_lineage_file_and_the_path(run_dir, parent, entry):
    shutil.rmtree(run_dir / parent)
    lineage_file = (run_dir / GRPO / "lineage.json").resolve()
    with pytest.raises(FileNotFoundError) as raised:
        load_policy(init=run_dir / GRPO, lora=None)
    message = str(raised.value)
    assert str(lineage_file) in message and repr(entry) in message, message
    assert str((run_dir / entry.replace("../../../", "")).resolve()) in message, message


def test_old_absolute_entries_and_hub_names_are_read_as_written(tmp_path, run_dir):
    checkpoint = tmp_path / "old"
    checkpoint.mkdir()
    absolute_base = str((run_dir / "base").resolve())
    (checkpoint / "lineage.json").write_text(json.dumps({"base": absolute_base, "adapters": []}))
    assert read_lineage(checkpoint) == {"base": absolute_base, "adapters": []}
    for hub_name in ("Qwen/Qwen3-1.7B", "gpt2"):
        (checkpoint / "lineage.json").write_text(json.dumps({"base": hub_name, "adapters": []}))
        assert read_lineage(checkpoint)["base"] == hub_name
    for local in ("./gone", "../gone", "runs/x/base", str(tmp_path / "gone"), "adapter"):
        (checkpoint / "lineage.json").write_text(json.dumps({"base": "gpt2", "adapters": [local]}))
        with pytest.raises(FileNotFoundError, match="adapter 1 of 1"):
            read_lineage(checkpoint)


# ----------------------------------------------------------------------------------------------
# grpo.export: one plain folder
# ----------------------------------------------------------------------------------------------


def test_export_of_a_lora_chain_loads_alone_with_the_merged_logprobs(tmp_path, run_dir, chain_template, ids):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = sequence_logprobs(load_policy(init=run_dir / GRPO, lora=None).model, ids)
    out = export_checkpoint(run_dir / GRPO, tmp_path / "exported")
    shutil.rmtree(run_dir)  # nothing of the chain is needed any more
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32  # "auto": the tiny base is saved in float32

    exported = sequence_logprobs(model, ids)
    torch.testing.assert_close(exported, merged, rtol=1e-6, atol=1e-6)
    bare = AutoModelForCausalLM.from_pretrained(chain_template / "base")
    assert (exported - sequence_logprobs(bare, ids)).abs().max() > 1e-2  # the merge changed the model

    weights = {name for file in out.glob("*.safetensors") for name in load_file(file)}
    assert weights and not any("lora_" in name or "base_layer" in name for name in weights)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["checkpoint"] == str((run_dir / GRPO).resolve()) and len(record["lineage"]["adapters"]) == 2
    assert not list(tmp_path.glob(".tmp-*"))  # the staging folder was renamed into place


def test_export_of_a_full_finetuning_checkpoint(tmp_path, run_dir, ids):
    from transformers import AutoModelForCausalLM

    policy = load_policy(base=str(run_dir / "base"), lora=None)
    with torch.no_grad():
        policy.model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    trained = sequence_logprobs(policy.model, ids)
    save_policy(policy, tmp_path / "full")
    assert json.loads((tmp_path / "full" / "lineage.json").read_text()) == {"base": "model", "adapters": []}

    out = export_checkpoint(tmp_path / "full", tmp_path / "exported")
    torch.testing.assert_close(sequence_logprobs(AutoModelForCausalLM.from_pretrained(out), ids), trained,
                               rtol=1e-6, atol=1e-6)


def test_cli_exports_the_newest_checkpoint_of_a_run_directory_in_bfloat16(tmp_path, run_dir, capsys):
    from transformers import AutoModelForCausalLM

    out = main([str(run_dir / "grpo"), "--out", str(tmp_path / "exported"), "--dtype", "bfloat16"])
    assert out == (tmp_path / "exported").resolve() and "exported" in capsys.readouterr().out
    assert json.loads((out / EXPORT_RECORD).read_text())["checkpoint"] == str((run_dir / GRPO).resolve())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_cli_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for flag in ("--checkpoint", "--out", "--dtype", "--trust-remote-code"):
        assert flag in text
    assert "python -m grpo.export" in text and "(default: 'auto'; one of auto, float32, bfloat16)" in text


def test_bad_paths_give_a_clear_exit(tmp_path, run_dir):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(SystemExit, match=f"{missing}: no such checkpoint directory"):
        main([str(missing), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=f"{run_dir / 'base'} is not a checkpoint: .*lineage.json.*needs no export"):
        main([str(run_dir / "base"), "--out", str(tmp_path / "a")])
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an empty folder"):
        main([str(run_dir / GRPO), "--out", str(tmp_path / "occupied")])
    shutil.rmtree(run_dir / "coldstart")  # a parent of the chain is gone
    with pytest.raises(SystemExit, match="cannot export .*lineage.json: the adapter 1 of 2"):
        main([str(run_dir / GRPO), "--out", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists()


def test_quantization_settings_of_the_base_are_not_saved(tmp_path, chain_template):
    from transformers import AutoConfig

    model, tokenizer = load_base_model(str(chain_template / "base"))
    model.config.quantization_config = {"quant_method": "gguf"}  # as a base converted from GGUF may carry
    save_plain_model(model, tokenizer, tmp_path / "plain", record={})
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not hasattr(AutoConfig.from_pretrained(tmp_path / "plain"), "quantization_config")
