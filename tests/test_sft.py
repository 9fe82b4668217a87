"""Tests for the SFT stages (sft/trainer.py, `python -m sft.train`).

The same tiny Qwen3 as test_grpo_trainer.py (hidden 32, 2 layers, 512-token tokenizer, built once
per session) and a dozen synthetic conversations.

What is checked: the loss is the cross-entropy of the loss-mask tokens only (against a hand-written
log-softmax gather); gradient accumulation equals one large batch (the normaliser is the step's
token count); a tiny model overfits four samples and a resumed run continues the step count; the
cold-start stage trains only on reasoning samples, renders non-empty think blocks (base: empty
ones), and starts exactly from the base stage's result (merged), which is also its reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data.batching import collate
from grpo.checkpoint import latest_checkpoint, load_trainer_state
from grpo.policy import LoraSettings, load_model_weights, load_policy, load_tokenizer, read_lineage
from sft.data import prepare_data
from sft.loss import accumulate_gradients, masked_nll_sum
from sft.trainer import SFTConfig, train

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return load_tokenizer(tiny_base)


def quiet(message: str) -> None:
    pass


def rendered_samples(small_data: Path, tokenizer, stage: str, spec: str = "coldstart.json", **overrides) -> list:
    config = SFTConfig(stage=stage, data=str(small_data / spec), val_fraction=0.0, **overrides)
    return prepare_data(config, tokenizer, quiet).train


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def test_masked_nll_sum_equals_a_hand_written_gather(tiny_base, small_data, tokenizer):
    model = load_model_weights(str(tiny_base))
    samples = rendered_samples(small_data, tokenizer, "coldstart")[:3]
    assert len({len(sample.input_ids) for sample in samples}) > 1  # right padding is exercised
    batch = collate(samples, tokenizer.pad_token_id)

    with torch.no_grad():
        nll, count = masked_nll_sum(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    expected, expected_count = 0.0, 0
    for row, sample in enumerate(samples):
        for position, (token, in_loss) in enumerate(zip(sample.input_ids, sample.loss_mask)):
            if in_loss:  # token `position` is predicted by the logits at position - 1
                expected -= float(log_probs[row, position - 1, token])
                expected_count += 1
    assert count == expected_count == sum(sum(sample.loss_mask) for sample in samples)
    assert float(nll) == pytest.approx(expected, rel=1e-5)

    # The renderer's mask (what the loss reads) covers exactly the completion, end-of-turn included.
    first = samples[0]
    assert first.loss_mask[: first.prompt_length] == [0] * first.prompt_length
    assert first.loss_mask[first.prompt_length:] == [1] * (len(first.input_ids) - first.prompt_length)


def test_accumulation_equals_one_large_batch(tiny_base, small_data, tokenizer):
    """4 micro-batches of 1 == 1 micro-batch of 4 == the token-mean loss of the 4 samples at once."""
    samples = rendered_samples(small_data, tokenizer, "coldstart")[:4]
    target_tokens = [sum(sample.loss_mask) for sample in samples]
    assert len(set(target_tokens)) > 1  # unequal lengths: a per-micro-batch mean would differ
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    policy = load_policy(base=str(tiny_base), lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # non-zero B so that every LoRA matrix gets a gradient
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    parameters = [parameter for parameter in policy.model.parameters() if parameter.requires_grad]

    def gradients(batches) -> tuple[float, int, list[torch.Tensor]]:
        for parameter in parameters:
            parameter.grad = None
        loss, tokens = accumulate_gradients(policy.model, batches, torch.device("cpu"))
        return loss, tokens, [parameter.grad.clone() for parameter in parameters]

    one_loss, one_tokens, one_batch = gradients([collate(samples, pad_id)])
    many_loss, many_tokens, accumulated = gradients([collate([sample], pad_id) for sample in samples])
    assert one_tokens == many_tokens == sum(target_tokens)
    assert many_loss == pytest.approx(one_loss, rel=1e-5)
    for left, right in zip(one_batch, accumulated):
        torch.testing.assert_close(right, left, rtol=1e-4, atol=1e-7)

    # The same value by hand: summed NLL of all samples over their total token count.
    with torch.no_grad():
        total = sum(float(masked_nll_sum(policy.model, collate([sample], pad_id))[0]) for sample in samples)
    assert one_loss == pytest.approx(total / sum(target_tokens), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Runs: overfitting, resume, stage chaining
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_stage(tmp_path_factory, tiny_base, small_data) -> Path:
    """Stage 1 with full fine-tuning on 4 samples: 12 steps, then --resume to 24 steps."""
    out = tmp_path_factory.mktemp("sft-base")
    config = SFTConfig(stage="base", model=str(tiny_base), data=str(small_data / "train.json"), out=str(out),
                       lora=False, lr=1e-2, lr_schedule="constant", warmup_steps=0, max_samples=4, micro_batch=4,
                       grad_accum=1, max_steps=12, log_every=1, eval_every=0, val_fraction=0.0, seed=0)
    train(config)
    train(SFTConfig(**{**config.__dict__, "max_steps": 24, "resume": True}))
    return out


def test_tiny_model_overfits_a_handful_of_samples(base_stage):
    losses = [record["loss"] for record in read_metrics(base_stage)]
    assert len(losses) == 24
    assert losses[-1] < 0.3 * losses[0], losses
    assert losses[12] < losses[11] * 1.05  # the resumed half continues where the first half stopped


def test_resume_continues_the_step_count(base_stage):
    metrics = read_metrics(base_stage)
    assert [record["step"] for record in metrics] == list(range(1, 25))
    assert "resumed from" in (base_stage / "log.txt").read_text()
    checkpoint = latest_checkpoint(base_stage)
    assert checkpoint.name == "step-000024"
    state = load_trainer_state(checkpoint)
    assert state["step"] == 24 and state["data_stats"]["train_samples"] == 4
    assert (checkpoint / "model" / "model.safetensors").is_file()  # full fine-tuning saves the whole model
    assert read_lineage(checkpoint) == {"base": str((checkpoint / "model").resolve()), "adapters": []}


def test_coldstart_starts_from_the_base_result_and_trains_on_reasoning_only(tmp_path, base_stage, small_data):
    base_checkpoint = latest_checkpoint(base_stage)
    out = tmp_path / "coldstart"
    train(SFTConfig(stage="coldstart", init=str(base_checkpoint), data=str(small_data / "coldstart.json"),
                    out=str(out), lora_r=4, lora_alpha=8, lr=1e-2, micro_batch=2, grad_accum=2, max_steps=2,
                    warmup_steps=0, eval_every=0, val_fraction=0.0, log_every=1))
    checkpoint = latest_checkpoint(out)
    assert checkpoint.name == "step-000002"
    stats = load_trainer_state(checkpoint)["data_stats"]
    assert stats["train_samples"] == 8  # the 8 actions with reasoning, not the file's 12 actions

    # Parents are recorded: the base stage's model, then this stage's adapter.
    lineage = read_lineage(checkpoint)
    assert lineage == {"base": str((base_checkpoint / "model").resolve()),
                       "adapters": [str((checkpoint / "adapter").resolve())]}

    from peft import PeftModel

    tokenizer = load_tokenizer(checkpoint)
    batch = collate(rendered_samples(small_data, tokenizer, "coldstart")[:2], tokenizer.pad_token_id)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.no_grad():
        base_result = load_model_weights(lineage["base"])(**inputs).logits
        stage = PeftModel.from_pretrained(load_model_weights(lineage["base"]), lineage["adapters"][0])
        with stage.disable_adapter():  # the cold-start stage's starting point == its reference policy
            reference = stage(**inputs).logits
        trained = stage(**inputs).logits
        # A later stage starting here (e.g. GRPO --init) merges the adapter and starts at `trained`.
        merged_next = load_policy(init=str(checkpoint), lora=LoraSettings(r=4, alpha=8))
        next_start = merged_next.model(**inputs).logits
    torch.testing.assert_close(reference, base_result, rtol=0, atol=1e-6)
    assert float((trained - base_result).abs().max()) > 1e-3  # the stage did train
    torch.testing.assert_close(next_start, trained, rtol=1e-4, atol=1e-5)


def test_coldstart_renders_reasoning_and_base_renders_empty_think(small_data, tokenizer):
    def targets(stage: str, **overrides) -> list[str]:
        """The text of every contiguous loss-masked run (one per action, also in packed sequences)."""
        runs = []
        for sample in rendered_samples(small_data, tokenizer, stage, **overrides):
            run: list[int] = []
            for token, in_loss in zip(sample.input_ids + [None], sample.loss_mask + [0]):
                if in_loss:
                    run.append(token)
                elif run:
                    runs.append(tokenizer.decode(run, skip_special_tokens=False))
                    run = []
        return runs

    coldstart = targets("coldstart")
    assert len(coldstart) == 8
    for text in coldstart:
        assert text.startswith(THINK_OPEN)
        reasoning = text[len(THINK_OPEN): text.index(THINK_CLOSE)]
        assert reasoning.strip(), text
    # The same file in stage 1: every action (12), reasoning stripped.
    base = targets("base")
    assert len(base) == 12
    assert all(text.startswith(f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n") for text in base), base[0]
    # Packing a conversation's turns into one sequence changes nothing the model is trained on.
    assert targets("base", pack_conversations=False) == base
    assert len(rendered_samples(small_data, tokenizer, "base", pack_conversations=False)) == 12
    assert len(rendered_samples(small_data, tokenizer, "base")) < 12
