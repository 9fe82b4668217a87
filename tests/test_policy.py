"""Tests for grpo.policy: tiny models, token log-probs, checkpoints and stage chaining.

Uses the real Qwen3 tokenizer from ../shared when present, else a small word-level tokenizer built
here, so the tests run anywhere.  Helpers `make_tokenizer` and `TINY` are shared with test_rollout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from grpo.hf_compat import position_ids_from_mask  # noqa: E402
from grpo.logprobs import token_logprobs  # noqa: E402
from grpo.policy import (  # noqa: E402
    LoraSettings,
    Policy,
    load_policy,
    policy_from_model,
    read_lineage,
    reference_mode,
    save_base_model,
    save_policy,
)
from grpo.tiny import TinyModelConfig, build_tiny_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
QWEN3_TOKENIZER = SHARED / "tokenizers" / "qwen3"
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
SMALL_LORA = LoraSettings(r=4, alpha=8)

WORDS = ("the user wants to book a flight from paris to london on monday please check the "
         "reservation and cancel it if needed thanks hello what is your name").split()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
            "</tool_call>", "<answer>", "</answer>"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build_word_tokenizer():
    """A word-level tokenizer over a few dozen words with the project's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + ["<unk>"] + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:])


def make_tokenizer():
    """The real Qwen3 tokenizer when ../shared has it, else the small word-level one."""
    if QWEN3_TOKENIZER.is_dir():
        from grpo.policy import load_tokenizer

        return load_tokenizer(QWEN3_TOKENIZER)
    return build_word_tokenizer()


def perturb_lora(model: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Stand-in for training: random LoRA A and B, so the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return build_tiny_model(tokenizer, TINY, seed=0)


# Checkpoint tests use the small word-level tokenizer: lineage logic does not depend on the
# vocabulary, and loading the 150k-token Qwen3 tokenizer for every checkpoint costs seconds.
@pytest.fixture(scope="module")
def word_model():
    return build_tiny_model(build_word_tokenizer(), TINY, seed=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, word_model):
    return save_base_model(word_model, build_word_tokenizer(), tmp_path_factory.mktemp("base"))


@pytest.fixture()
def word_ids():
    generator = torch.Generator().manual_seed(4)
    return torch.randint(0, len(build_word_tokenizer()), (2, 9), generator=generator)


@pytest.fixture()
def sample_ids(tokenizer):
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, len(tokenizer), (2, 9), generator=generator)


# ----------------------------------------------------------------------------------------------
# build_tiny_model
# ----------------------------------------------------------------------------------------------


def test_build_tiny_model_matches_tokenizer_and_seed(tokenizer, tiny_model):
    config = tiny_model.config
    assert config.model_type == "qwen3"
    assert config.vocab_size == len(tokenizer)
    assert tiny_model.get_input_embeddings().weight.shape == (len(tokenizer), TINY.hidden_size)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert config.num_hidden_layers == TINY.num_layers and config.num_key_value_heads == TINY.num_kv_heads
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.get_input_embeddings().weight.data_ptr()

    rng_before = torch.random.get_rng_state()
    same = build_tiny_model(tokenizer, TINY, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building must not move the global RNG"
    other = build_tiny_model(tokenizer, TINY, seed=1)
    first_weight = dict(tiny_model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(first_weight, dict(same.named_parameters())["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(first_weight, dict(other.named_parameters())["model.layers.0.self_attn.q_proj.weight"])


def test_position_ids_count_only_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


# ----------------------------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------------------------


def naive_logprobs(model, input_ids, attention_mask, completion_start, temperature):
    """Full-vocabulary logits at every position, log_softmax, gather: the obvious slow version."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask)).logits / temperature
    logprobs = torch.log_softmax(logits.float(), dim=-1)[:, completion_start - 1:-1]
    probs = logprobs.exp()
    entropy = -(probs * logprobs).sum(-1)
    return logprobs.gather(-1, input_ids[:, completion_start:, None]).squeeze(-1), entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_logprobs_equal_naive_full_logits(tiny_model, sample_ids, temperature):
    # Row 0 is left-padded by three tokens: positions must count only real tokens.
    attention_mask = torch.ones_like(sample_ids)
    attention_mask[0, :3] = 0
    logprobs, entropy = token_logprobs(tiny_model, sample_ids, attention_mask, completion_start=5,
                                       temperature=temperature, return_entropy=True)
    expected, expected_entropy = naive_logprobs(tiny_model, sample_ids, attention_mask, 5, temperature)
    assert logprobs.shape == (2, 4) and entropy.shape == (2, 4)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-4, rtol=1e-5)
    # A token's log-prob is a log of a probability.
    assert (logprobs <= 0).all()


def test_token_logprobs_chunked_equals_unchunked_with_gradients(tokenizer, sample_ids):
    model = build_tiny_model(tokenizer, TINY, seed=5)
    attention_mask = torch.ones_like(sample_ids)
    plain = token_logprobs(model, sample_ids, attention_mask, completion_start=2, temperature=0.9)
    plain.sum().backward()
    plain_grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    chunked = token_logprobs(model, sample_ids, attention_mask, completion_start=2, temperature=0.9, chunk_size=3)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-6)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, plain_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_token_logprobs_on_peft_model_and_edge_lengths(tiny_model, sample_ids):
    policy = policy_from_model(build_tiny_model_like(tiny_model), None, base="unused", lora=SMALL_LORA)
    perturb_lora(policy.model, seed=1)
    attention_mask = torch.ones_like(sample_ids)
    expected, _ = naive_logprobs(policy.model, sample_ids, attention_mask, 4, 1.0)
    torch.testing.assert_close(token_logprobs(policy.model, sample_ids, attention_mask, completion_start=4),
                               expected, atol=1e-5, rtol=1e-5)
    # T = 0 gives an empty [N, 0]; completion_start 0 has no position to predict from.
    empty = token_logprobs(tiny_model, sample_ids, attention_mask, completion_start=sample_ids.shape[1])
    assert empty.shape == (2, 0)
    with pytest.raises(ValueError, match="completion_start"):
        token_logprobs(tiny_model, sample_ids, attention_mask, completion_start=0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(tiny_model, sample_ids, attention_mask, completion_start=1, temperature=0.0)


def build_tiny_model_like(model):
    """An independent copy of a tiny model (LoRA wrapping must not touch the shared fixture)."""
    import copy

    return copy.deepcopy(model)


# ----------------------------------------------------------------------------------------------
# Checkpoints and stage chaining
# ----------------------------------------------------------------------------------------------


def test_lora_save_load_round_trip_and_rename(tmp_path, base_dir, word_model, word_ids):
    policy = load_policy(base=str(base_dir), lora=SMALL_LORA)
    assert policy.use_lora and policy.lineage == {"base": str(base_dir.resolve()), "adapters": []}
    trainable = {name for name, parameter in policy.model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # A fresh adapter (B = 0) leaves the model's outputs unchanged.
    torch.testing.assert_close(logits_of(policy.model, word_ids), logits_of(word_model, word_ids))

    perturb_lora(policy.model, seed=2)
    trained = logits_of(policy.model, word_ids)
    assert (trained - logits_of(word_model, word_ids)).abs().max() > 1e-3

    tmp_dir = tmp_path / "step_1.tmp"
    save_policy(policy, tmp_dir)
    final_dir = tmp_path / "step_1"
    tmp_dir.rename(final_dir)  # checkpoints are written to a temporary directory, then renamed
    files = {path.relative_to(final_dir).as_posix() for path in final_dir.rglob("*") if path.is_file()}
    assert "adapter/adapter_model.safetensors" in files and "adapter/adapter_config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    # Parents are stored relative to the checkpoint (here "../../base0"), resolved when read.
    assert json.loads((final_dir / "lineage.json").read_text()) == {
        "base": os.path.relpath(base_dir.resolve(), final_dir.resolve()), "adapters": ["adapter"]}
    assert read_lineage(final_dir)["base"] == str(base_dir.resolve())
    assert read_lineage(final_dir)["adapters"] == [str((final_dir / "adapter").resolve())]

    reloaded = load_policy(init=final_dir, lora=SMALL_LORA)
    torch.testing.assert_close(logits_of(reloaded.model, word_ids), trained, atol=1e-5, rtol=1e-5)
    assert reloaded.tokenizer.eos_token_id == policy.tokenizer.eos_token_id


def test_full_finetune_save_load_round_trip(tmp_path, base_dir, word_ids):
    policy = load_policy(base=str(base_dir), lora=None)
    assert not policy.use_lora
    assert all(parameter.requires_grad for parameter in policy.model.parameters())
    with torch.no_grad():
        policy.model.model.layers[0].mlp.down_proj.weight.add_(0.05)
    trained = logits_of(policy.model, word_ids)
    save_policy(policy, tmp_path / "full.tmp")
    (tmp_path / "full.tmp").rename(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "lineage.json").read_text()) == {"base": "model", "adapters": []}
    assert list((tmp_path / "full" / "model").glob("*.safetensors"))
    reloaded = load_policy(init=tmp_path / "full", lora=None)
    torch.testing.assert_close(logits_of(reloaded.model, word_ids), trained, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="frozen copy"):
        with reference_mode(reloaded):
            pass


def test_stage_chaining_merges_parents_and_reference_is_the_merged_start(tmp_path, base_dir, word_model, word_ids):
    from peft import PeftModel

    # Stage A: base + LoRA, "trained", saved.
    stage_a = load_policy(base=str(base_dir), lora=SMALL_LORA)
    perturb_lora(stage_a.model, seed=11)
    logits_a = logits_of(stage_a.model, word_ids)
    save_policy(stage_a, tmp_path / "a")

    # The saved adapter loads with plain peft on its base.
    fresh_base = build_tiny_model_like(word_model)
    with_peft = PeftModel.from_pretrained(fresh_base, str(tmp_path / "a" / "adapter"))
    torch.testing.assert_close(logits_of(with_peft, word_ids), logits_a, atol=1e-5, rtol=1e-5)

    # Stage B starts from A: A merged in memory, a fresh adapter on top.
    stage_b = load_policy(init=tmp_path / "a", lora=SMALL_LORA)
    assert stage_b.lineage["adapters"] == [str((tmp_path / "a" / "adapter").resolve())]
    torch.testing.assert_close(logits_of(stage_b.model, word_ids), logits_a, atol=1e-5, rtol=1e-5)
    perturb_lora(stage_b.model, seed=12)
    logits_b = logits_of(stage_b.model, word_ids)
    assert (logits_b - logits_a).abs().max() > 1e-3
    with reference_mode(stage_b):
        # The KL reference is exactly the stage's starting point (A merged), not the bare base.
        torch.testing.assert_close(logits_of(stage_b.model, word_ids), logits_a, atol=1e-5, rtol=1e-5)
        reference_logprobs = token_logprobs(stage_b.model, word_ids, torch.ones_like(word_ids),
                                            completion_start=3)
    expected_reference, _ = naive_logprobs(with_peft, word_ids, torch.ones_like(word_ids), 3, 1.0)
    torch.testing.assert_close(reference_logprobs, expected_reference, atol=1e-5, rtol=1e-5)
    # Leaving reference mode switches the adapter back on.
    torch.testing.assert_close(logits_of(stage_b.model, word_ids), logits_b)

    # Stage C starts from B: A then B merged, in order.
    save_policy(stage_b, tmp_path / "b")
    lineage_b = json.loads((tmp_path / "b" / "lineage.json").read_text())
    assert lineage_b["adapters"] == ["../a/adapter", "adapter"]
    stage_c = load_policy(init=tmp_path / "b", lora=SMALL_LORA)
    assert stage_c.lineage["adapters"] == [str((tmp_path / "a" / "adapter").resolve()),
                                           str((tmp_path / "b" / "adapter").resolve())]
    torch.testing.assert_close(logits_of(stage_c.model, word_ids), logits_b, atol=1e-5, rtol=1e-5)
    with reference_mode(stage_c):
        torch.testing.assert_close(logits_of(stage_c.model, word_ids), logits_b, atol=1e-5, rtol=1e-5)


def test_load_policy_rejects_bad_arguments(tmp_path, base_dir):
    with pytest.raises(ValueError, match="exactly one"):
        load_policy(base=str(base_dir), init=str(base_dir))
    with pytest.raises(ValueError, match="exactly one"):
        load_policy()
    with pytest.raises(FileNotFoundError, match="lineage.json"):
        load_policy(init=tmp_path)
    with pytest.raises(ValueError, match="target modules"):
        load_policy(base=str(base_dir), lora=LoraSettings(target_modules=("no_such_proj",)))


def test_policy_dataclass_defaults():
    policy = Policy(model=None, tokenizer=None)
    assert policy.lineage == {"base": "", "adapters": []} and policy.use_lora
    assert LoraSettings().target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj")
