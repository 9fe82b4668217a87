"""The policy layer: load a causal LM, attach LoRA, chain training stages, and score tokens.

Shared by `grpo`, `sft` and `eval`.  Four things live here:

1. Loading.  `load_base_model` opens any Hugging Face causal LM by hub name or local directory
   (safetensors only, `trust_remote_code` off unless asked); `build_tiny_model` builds a small
   random Qwen3 from a config for tests and `--model tiny`.

2. Stage chaining.  A checkpoint written by `save_policy` holds `lineage.json`:

       {"base": <hub name or directory of a full model>, "adapters": [<adapter dir>, ...]}

   `load_policy(init=CHECKPOINT)` loads the base, merges every adapter into it in order
   (W <- W + (alpha/r) B A, one adapter at a time, in memory) and attaches a *fresh* LoRA adapter,
   whose B = 0 initialisation makes the new policy start exactly at the merged model.  That merged
   model is the stage's reference policy: `reference_mode(policy)` switches the adapter off, so the
   KL reference costs no second copy of the weights.

3. Saving.  `save_policy` writes `adapter/` (peft, safetensors) or `model/` (full fine-tuning),
   `tokenizer/` and `lineage.json`.  Paths inside the checkpoint are stored relative to it, so the
   caller may write into a temporary directory and rename it afterwards.

4. Scoring.  `token_logprobs` returns log pi(y_t | x, y_<t) of completion tokens at a sampling
   temperature tau (logits divided by tau, as TRL does), projecting only the hidden states that
   predict completion tokens onto the vocabulary.  `grouped_token_logprobs` returns the same
   values for G completions of each prompt while running each prompt through the model once
   (its completions attend to its keys and values): B*P + B*G*T tokens instead of B*G*(P + T).
   The GRPO trainer uses it for every forward of a step (GRPOConfig.share_prefix, on by default)
   on the families in `SHARED_PREFIX_MODEL_TYPES` with full attention in every layer; other
   models get the unshared computation.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

LINEAGE_FILE = "lineage.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"

# Architectures whose logits are exactly `lm_head(decoder(...).last_hidden_state)` (no soft-capping,
# no logit scaling).  For these `token_logprobs` runs the decoder and the head itself, which lets it
# project (and chunk) only the positions it needs; any other model goes through its own forward
# with `logits_to_keep`.
PLAIN_HEAD_MODEL_TYPES: frozenset[str] = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo2",
    "smollm3", "gpt_neox",
})

# Families whose attention layers pass the cache's keys and values to transformers' attention
# interface and whose logits are plain (a subset of the above): the rollout and the training
# forward can then share each prompt's keys and values among its G completions.
SHARED_PREFIX_MODEL_TYPES: frozenset[str] = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "phi3", "olmo2", "smollm3",
})
GROUPED_PREFIX_ATTENTION = "grpo_grouped_prefix"


# ----------------------------------------------------------------------------------------------
# Configuration containers
# ----------------------------------------------------------------------------------------------


# The paper's LoRA targets: every attention and MLP projection (the one list every entry point uses).
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pad_token_id(tokenizer: Any, fallback: int | None = None) -> int:
    """The tokenizer's pad id, else `fallback`, else its EOS id (padding is always masked out)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return fallback if fallback is not None else tokenizer.eos_token_id


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; the default targets are the paper's (every attention and MLP projection)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoraSettings.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("LoraSettings.target_modules is empty")
        self.target_modules = tuple(self.target_modules)


@dataclass
class TinyModelConfig:
    """A small Qwen3-architecture model (random weights) for tests and `--model tiny`."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    head_dim: int | None = None  # None: hidden_size // num_heads
    tie_word_embeddings: bool = True


@dataclass
class Policy:
    """A trainable causal LM with its tokenizer and where it came from.

    model: a `peft.PeftModel` when `use_lora`, else the plain transformers model (all parameters
    trainable).  lineage: `{"base": str, "adapters": [str, ...]}`, the full model and the adapters
    merged into it, in order, to obtain this policy's starting point (the reference policy).
    """

    model: Any
    tokenizer: Any
    lineage: dict[str, Any] = field(default_factory=lambda: {"base": "", "adapters": []})
    use_lora: bool = True


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of a model's first parameter."""
    parameter = next(model.parameters())
    return parameter.dtype, parameter.device


def _resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device, hidden_size: int | None) -> torch.dtype:
    """A torch dtype from a dtype, a name (`grpo.runtime.DTYPES`) or "auto"/None (`grpo.runtime.auto_dtype`)."""
    from grpo.runtime import DTYPES, auto_dtype

    if dtype is None or dtype == "auto":
        return auto_dtype(device, hidden_size)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside `model` (a PeftModel's base model keeps its LoRA layers)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def cache_argument(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword that passes a KV cache to `module.forward`: `cache` in transformers releases
    that renamed it (5.2x, where `past_key_values` is deprecated and due to go in 5.40), else
    `past_key_values`."""
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(module_type: type) -> str:
    parameters = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens: for mask [0, 0, 1, 1, 1] -> [0, 0, 0, 1, 2].

    Left padding therefore does not shift a prompt's rotary positions; pad positions get 0 (they
    are masked out as keys and their outputs are never read).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


# ----------------------------------------------------------------------------------------------
# Loading models
# ----------------------------------------------------------------------------------------------


def build_tiny_model(tokenizer: Any, config: TinyModelConfig = TinyModelConfig(), *, seed: int = 0):
    """A randomly initialised `Qwen3ForCausalLM` whose vocabulary is the tokenizer's.

    The weights depend only on `seed`; the global torch RNG is left untouched.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if config.hidden_size % config.num_heads and config.head_dim is None:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}; set head_dim")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"num_heads {config.num_heads} is not a multiple of num_kv_heads {config.num_kv_heads}")
    eos_token_id = tokenizer.eos_token_id
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_id
    qwen3_config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        head_dim=config.head_dim or config.hidden_size // config.num_heads,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(qwen3_config)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def load_base_model(name_or_path: str, *, dtype: torch.dtype | str | None = None, device: str = "cpu",
                    trust_remote_code: bool = False):
    """(model, tokenizer) from a hub name or a local directory; safetensors weights only.

    dtype None or "auto": `grpo.runtime.auto_dtype` for this model.  The tokenizer is read from
    `name_or_path` (or its `tokenizer/` subdirectory when the directory is one of our checkpoints).
    """
    model = load_model_weights(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


def load_model_weights(name_or_path: str, *, dtype: torch.dtype | str | None = None, device: str = "cpu",
                       trust_remote_code: bool = False):
    """The causal LM alone (see `load_base_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hidden_size = None
        if dtype is None or dtype == "auto":
            model_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            hidden_size = getattr(model_config.get_text_config(), "hidden_size", None)
        torch_dtype = _resolve_dtype(dtype, device, hidden_size)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
        )
    except OSError as error:
        raise OSError(f"could not load a causal LM from {name_or_path!r} (a hub name or a directory "
                      f"with config.json and *.safetensors is expected): {error}") from error
    return model.to(device)


def load_tokenizer(name_or_path: str | Path, *, trust_remote_code: bool = False):
    """AutoTokenizer from a hub name or directory, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    location = Path(name_or_path)
    if (location / TOKENIZER_DIR).is_dir():
        location = location / TOKENIZER_DIR
    source = str(location) if location.exists() else str(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Policies, stage chaining, checkpoints
# ----------------------------------------------------------------------------------------------


def attach_lora(model: torch.nn.Module, lora: LoraSettings):
    """Wrap `model` in a PeftModel with one fresh LoRA adapter (B = 0, so outputs are unchanged)."""
    from peft import LoraConfig, get_peft_model

    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in lora.target_modules if name not in module_names]
    if len(missing) == len(lora.target_modules):
        raise ValueError(f"none of the LoRA target modules {list(lora.target_modules)} exist in "
                         f"{type(model).__name__}; pass target_modules that name its linear layers")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=[name for name in lora.target_modules if name not in missing],
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def policy_from_model(model: torch.nn.Module, tokenizer: Any, *, base: str,
                      lora: LoraSettings | None = LoraSettings()) -> Policy:
    """A Policy around an in-memory model (e.g. from `build_tiny_model`).

    `base` must name where this exact model is saved (a directory written with `save_base_model`
    or a hub name), so that checkpoints of the policy can be reloaded.
    """
    lineage = {"base": str(base), "adapters": []}
    return _finish_policy(model, tokenizer, lineage, lora)


def save_base_model(model: torch.nn.Module, tokenizer: Any, directory: str | Path) -> Path:
    """Save a full model and its tokenizer (safetensors) so it can serve as a lineage base."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _finish_policy(model: torch.nn.Module, tokenizer: Any, lineage: dict[str, Any],
                   lora: LoraSettings | None) -> Policy:
    if lora is None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return Policy(model=model, tokenizer=tokenizer, lineage=lineage, use_lora=False)
    return Policy(model=attach_lora(model, lora), tokenizer=tokenizer, lineage=lineage, use_lora=True)


def read_lineage(checkpoint: str | Path) -> dict[str, Any]:
    """`lineage.json` of a checkpoint with every local path resolved to an absolute path.

    Local entries are stored relative to the checkpoint directory (`save_policy`), so they are
    resolved against it; absolute entries (written before lineages were relative) are accepted
    as they are.  An entry that does not exist there is kept as written when it has the form of a
    hub name (`name` or `org/name`); any other missing entry is a local directory that was moved
    or deleted, and raises FileNotFoundError naming the lineage file and the missing path (a
    clearer message than transformers' hub lookup would give for it).
    """
    import os

    checkpoint = Path(checkpoint).resolve()
    lineage_path = checkpoint / LINEAGE_FILE
    if not lineage_path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a policy checkpoint: {LINEAGE_FILE} is missing")
    raw = json.loads(lineage_path.read_text())
    if not isinstance(raw, dict) or "base" not in raw or not isinstance(raw.get("adapters", []), list):
        raise ValueError(f"{lineage_path} must hold {{'base': str, 'adapters': [str, ...]}}, got {raw!r}")

    def could_be_hub_name(entry: str) -> bool:
        # Hub ids are `name` or `org/name`; a relative path that leaves the checkpoint starts with
        # "..", and the directories save_policy writes inside it are named ADAPTER_DIR and MODEL_DIR.
        parts = entry.split("/")
        return (len(parts) <= 2 and "\\" not in entry and entry not in (ADAPTER_DIR, MODEL_DIR)
                and all(part and not part.startswith((".", "-", "~")) for part in parts))

    def resolve(entry: str, role: str) -> str:
        candidate = checkpoint / entry  # an absolute entry replaces the checkpoint directory here
        if candidate.exists():
            return str(candidate.resolve())
        if could_be_hub_name(entry):
            return entry
        raise FileNotFoundError(
            f"{lineage_path}: the {role} {entry!r} is missing (looked for {os.path.normpath(candidate)}).  Parents "
            f"are stored relative to the checkpoint: move a run directory together with the runs its stages "
            f"started from, or restore the missing directory")

    adapters = raw.get("adapters", [])
    return {"base": resolve(raw["base"], "base model"),
            "adapters": [resolve(entry, f"adapter {index} of {len(adapters)}")
                         for index, entry in enumerate(adapters, start=1)]}


def load_policy(*, base: str | None = None, init: str | Path | None = None,
                lora: LoraSettings | None = LoraSettings(), dtype: torch.dtype | str | None = None,
                device: str = "cpu", trust_remote_code: bool = False) -> Policy:
    """Load the starting point of a training stage and make it trainable.

    Exactly one of `base` (hub name or directory of a full model) and `init` (a checkpoint written
    by `save_policy`).  With `init`, the lineage base is loaded and each recorded adapter merged
    into it in order; the merged model is the new stage's reference policy.  Then `lora` attaches a
    fresh adapter, or `lora=None` makes every parameter trainable (full fine-tuning).
    """
    from peft import PeftModel

    if (base is None) == (init is None):
        raise ValueError(f"load_policy needs exactly one of base= or init=, got base={base!r}, init={init!r}")
    if init is not None:
        lineage = read_lineage(init)
        tokenizer_source: str | Path = Path(init) if (Path(init) / TOKENIZER_DIR).is_dir() else lineage["base"]
    else:
        base_path = Path(str(base))
        lineage = {"base": str(base_path.resolve()) if base_path.exists() else str(base), "adapters": []}
        tokenizer_source = lineage["base"]

    model = load_model_weights(lineage["base"], dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    for adapter_dir in lineage["adapters"]:
        if not Path(adapter_dir, "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter {adapter_dir!r} from the lineage of {init} is missing")
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code)
    return _finish_policy(model, tokenizer, lineage, lora)


def _relative_or_absolute(path: str, checkpoint: Path) -> str:
    """A lineage entry as `save_policy` stores it: a local path relative to the `checkpoint`
    directory ("adapter", "../../../coldstart/checkpoints/step-000036/adapter"), a hub name as it is.

    Relative parents keep a chain of stages valid when the run directory holding it is moved or
    copied as a whole.  Both paths are resolved first, because the ".." of a relative path is
    followed from the checkpoint's real location.  An absolute path remains only where no relative
    one exists (another drive on Windows).
    """
    import os

    candidate = Path(path)
    if not path or not candidate.exists():
        return path  # a hub name
    candidate = candidate.resolve()
    try:
        return Path(os.path.relpath(candidate, checkpoint)).as_posix()
    except ValueError:  # Windows: no relative path between two drives
        return str(candidate)


def save_policy(policy: Policy, directory: str | Path) -> None:
    """Write `adapter/` or `model/`, `tokenizer/` and `lineage.json` into `directory`.

    LoRA: `adapter/` is loadable with `PeftModel.from_pretrained(merged_base, directory/"adapter")`,
    and the lineage gains this adapter after its parents.  Full fine-tuning: `model/` is a complete
    model, which becomes the lineage base (no adapters).  Weights are safetensors only.

    Local lineage paths are written relative to `directory` (`_relative_or_absolute`), so a caller
    that writes into a temporary directory must place it beside the final one (the same parent, as
    grpo.checkpoint.write_checkpoint does): the rename then leaves every relative path valid.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if policy.use_lora:
        policy.model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
        lineage = {
            "base": _relative_or_absolute(policy.lineage["base"], directory),
            "adapters": [_relative_or_absolute(entry, directory) for entry in policy.lineage["adapters"]]
            + [ADAPTER_DIR],
        }
    else:
        policy.model.save_pretrained(directory / MODEL_DIR, safe_serialization=True)
        lineage = {"base": MODEL_DIR, "adapters": []}
    policy.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    (directory / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")


@contextlib.contextmanager
def reference_mode(policy: Policy) -> Iterator[None]:
    """Run the reference policy (the stage's starting point) inside this context.

    With LoRA that is the same model with its adapter switched off.  Full fine-tuning has no
    adapter to switch off: the caller must keep a frozen copy of the starting model instead.
    """
    if not policy.use_lora:
        raise RuntimeError("reference_mode needs a LoRA policy: with full fine-tuning (lora=None) keep a "
                           "frozen copy of the starting model for the KL reference instead")
    with policy.model.disable_adapter():
        yield


# ----------------------------------------------------------------------------------------------
# Token log-probabilities
# ----------------------------------------------------------------------------------------------


def _logprobs_and_entropy(logits: Tensor, targets: Tensor, temperature: float,
                          want_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """log softmax(z / tau)[y] = z_y / tau - logsumexp(z / tau), in fp32, without a [.., V] log-softmax.

    Entropy H = logsumexp(z') - sum_v p_v z'_v (z' = z / tau) is a diagnostic and carries no gradient.
    """
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1)
    logprobs = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normaliser
    entropy = None
    if want_entropy:
        with torch.no_grad():
            probs = torch.softmax(scaled.detach(), dim=-1)
            entropy = log_normaliser.detach() - (probs * scaled.detach()).sum(-1)
    return logprobs, entropy


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, *, completion_start: int,
                   temperature: float = 1.0, position_ids: Tensor | None = None, return_entropy: bool = False,
                   chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities [N, T] of the tokens `input_ids[:, completion_start:]` (T = L - completion_start).

    logp[n, t] = log softmax(z[n, completion_start + t - 1] / temperature)[input_ids[n, completion_start + t]]

    Only the hidden states at positions completion_start - 1 .. L - 2 are projected onto the
    vocabulary, so at most [N, T, V] logits exist at once, and [N, chunk_size, V] when
    `chunk_size` is set (then, with gradients on, each chunk's logits are recomputed in the
    backward pass instead of being stored).  `position_ids` default to positions that count only
    real tokens (left padding safe).  Works on a PeftModel (LoRA active unless inside
    `reference_mode`) and on a plain model.  With `return_entropy`, also the per-token entropy of
    the same distribution (detached).  Values at masked positions are computed but meaningless.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [N, L]; got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    sequence_length = input_ids.shape[1]
    if not 1 <= completion_start <= sequence_length:
        raise ValueError(f"completion_start must be in [1, {sequence_length}] (at least one prompt token), "
                         f"got {completion_start}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    targets = input_ids[:, completion_start:]

    causal_lm = causal_lm_of(model)
    if getattr(causal_lm.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        # Unknown head (soft-capping, scaling, ...): let the model compute its own logits.
        keep = torch.arange(completion_start - 1, sequence_length - 1, device=input_ids.device)
        logits = causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, logits_to_keep=keep).logits
        logprobs, entropy = _logprobs_and_entropy(logits, targets, temperature, return_entropy)
        return (logprobs, entropy) if return_entropy else logprobs

    hidden = causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, completion_start - 1: sequence_length - 1]
    return _score_hidden(causal_lm, hidden, targets, temperature, return_entropy, chunk_size)


def _score_hidden(causal_lm: torch.nn.Module, hidden: Tensor, targets: Tensor, temperature: float,
                  return_entropy: bool, chunk_size: int | None) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs [N, T] (and entropies) of `targets` [N, T] from the hidden states [N, T, H] that
    predict them, through the model's output head, `chunk_size` positions at a time (each chunk's
    logits recomputed in the backward pass when gradients are on)."""
    lm_head = causal_lm.get_output_embeddings()
    num_targets = targets.shape[1]

    def score(hidden_chunk: Tensor, target_chunk: Tensor) -> tuple[Tensor, Tensor | None]:
        return _logprobs_and_entropy(lm_head(hidden_chunk), target_chunk, temperature, return_entropy)

    step = chunk_size or max(num_targets, 1)
    recompute = chunk_size is not None and torch.is_grad_enabled() and hidden.requires_grad
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, num_targets, step):
        hidden_chunk, target_chunk = hidden[:, start:start + step], targets[:, start:start + step]
        if recompute:
            from torch.utils.checkpoint import checkpoint

            chunk_logprobs, chunk_entropy = checkpoint(score, hidden_chunk, target_chunk, use_reentrant=False)
        else:
            chunk_logprobs, chunk_entropy = score(hidden_chunk, target_chunk)
        logprob_chunks.append(chunk_logprobs)
        entropy_chunks.append(chunk_entropy)
    if not logprob_chunks:  # T == 0
        empty = hidden.new_zeros(targets.shape[0], 0, dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    logprobs = torch.cat(logprob_chunks, dim=1) if len(logprob_chunks) > 1 else logprob_chunks[0]
    if not return_entropy:
        return logprobs
    entropy = torch.cat(entropy_chunks, dim=1) if len(entropy_chunks) > 1 else entropy_chunks[0]
    return logprobs, entropy


# ----------------------------------------------------------------------------------------------
# Shared-prefix log-probabilities: each prompt computed once for its group of completions
# ----------------------------------------------------------------------------------------------


class _PromptPrefix:
    """The prompts' keys and values (one copy per prompt, with their autograd history) and the
    masks the completion tokens attend with; reaches the attention function as the keyword
    `prompt_prefix`.  Deliberately not a dataclass: FSDP rebuilds dataclass and list keyword
    arguments before each layer's forward, and `calls` must count on the caller's object."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], prompt_mask: Tensor, completion_mask: Tensor,
                 group_size: int) -> None:
        self.keys = keys  # per layer [B, kv_heads, P, head_dim]
        self.values = values  # per layer [B, kv_heads, P, head_dim]
        self.prompt_mask = prompt_mask  # [B, P] bool, True on real prompt tokens
        self.completion_mask = completion_mask  # [B*G, T'] bool, True on real completion tokens (own keys)
        self.group_size = group_size
        self.calls = 0  # attention calls served: one per layer when the model routes attention here


def supports_shared_prefix(model: torch.nn.Module) -> bool:
    """Whether `grouped_token_logprobs` (and the rollout) can share prompt keys and values for this
    model: a decoder-only family known to route attention through transformers' attention
    interface and to compute logits as `lm_head(hidden)`, with full (not sliding-window)
    attention in every layer."""
    config = causal_lm_of(model).config
    if getattr(config, "model_type", None) not in SHARED_PREFIX_MODEL_TYPES:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(layer_type == "full_attention" for layer_type in layer_types)
    return getattr(config, "sliding_window", None) is None


def grouped_prefix_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                             prompt_prefix: _PromptPrefix | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Attention of completion tokens over [their prompt | their own completion so far].

    query [B*G, heads, T', d]; key/value [B*G, kv_heads, T', d]: the completions' own tokens (row
    b*G + g is sample g of prompt b); the prompts' keys/values [B, kv_heads, P, d] come in
    `prompt_prefix`.  Completion token t of a row sees the real tokens of its prompt and its own
    real tokens 0..t (the `attention_mask` argument is unused).  Returns [B*G, T', heads, d].

    Each row's keys are [prompt keys ; own keys], built by one concatenation from a broadcast view
    of the prompt's (no second prompt forward, and the gradient of all G copies sums into the one
    prompt forward), then a fused `scaled_dot_product_attention` with a boolean mask.  The copy
    is G * P * kv_heads * d per layer, small beside the G * P tokens of activations it replaces,
    and the fused kernel stores no [T', P + T'] score matrix for the backward pass.
    """
    prefix = prompt_prefix
    if not isinstance(prefix, _PromptPrefix):
        raise RuntimeError("grouped_prefix_attention needs the prompt_prefix keyword (see grouped_token_logprobs)")
    prefix.calls += 1
    rows, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    prompt_keys, prompt_values = prefix.keys[module.layer_idx], prefix.values[module.layer_idx]
    num_prompts, group_size, prompt_length = prompt_keys.shape[0], prefix.group_size, prompt_keys.shape[2]
    # The CPU kernel handles grouped-query heads itself; CUDA kernels with a mask would fall back to
    # the unfused path, so there every kv head is repeated for the query heads it serves.
    repeats = 1 if query.device.type == "cpu" else heads // kv_heads

    def rows_of(prompt_part: Tensor, own_part: Tensor) -> Tensor:  # -> [B*G, kv_heads * repeats, P + T', d]
        prompt_part = prompt_part[:, None, :, None].expand(num_prompts, group_size, kv_heads, repeats,
                                                           prompt_length, prompt_part.shape[-1])
        own_part = own_part.reshape(num_prompts, group_size, kv_heads, 1, length, own_part.shape[-1]).expand(
            -1, -1, -1, repeats, -1, -1)
        joined = torch.cat([prompt_part, own_part], dim=4)
        return joined.view(rows, kv_heads * repeats, prompt_length + length, joined.shape[-1])

    causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    own_visible = causal[None] & prefix.completion_mask[:, None, :]  # [B*G, T', T']
    prompt_visible = prefix.prompt_mask.repeat_interleave(group_size, dim=0)[:, None, :].expand(rows, length, -1)
    mask = torch.cat([prompt_visible, own_visible], dim=-1)[:, None]  # [B*G, 1, T', P + T']
    output = torch.nn.functional.scaled_dot_product_attention(
        query, rows_of(prompt_keys, key), rows_of(prompt_values, value), attn_mask=mask, dropout_p=dropout,
        scale=scaling, enable_gqa=repeats * kv_heads != heads)
    return output.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _attention_implementation(config: Any, name: str) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def grouped_token_logprobs(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                           completion_mask: Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
                           chunk_size: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities [B, G, T] of G completions per prompt, computing each prompt once.

    logp[b, g, t] = log softmax(z / temperature)[completion_ids[b, g, t]], z the logits after
    prompt b (left-padded, `prompt_mask` [B, P]) and completion tokens 0..t-1 of sample g.  This
    equals `token_logprobs` on the G rows [prompt_b ; completion_bg] (same positions, same masks),
    but runs about B*P + B*G*T tokens through the model instead of B*G*(P + T):

    1. The prompts go through the decoder once, with gradient when it is on (LoRA changes the
       prompts' keys and values), keeping every layer's keys and values.  The hidden state of a
       prompt's last token predicts the first completion token of all its G samples.
    2. The completions (tokens 0..T-2; the last one predicts nothing) go through the decoder as
       B*G rows at positions prompt_length + 0, 1, ...  In each layer `grouped_prefix_attention`
       lets them attend to [their prompt's keys and values ; their own], so the gradient of every
       completion's attention flows back into the one prompt forward (autograd sums the G
       contributions).

    completion_mask [B, G, T]: 1 on real tokens.  Completion keys where it is 0 are hidden and
    positions count only real tokens, exactly as in `token_logprobs`.  Families outside
    `supports_shared_prefix` are computed the unshared way (rows repeated), with the same result.
    Values at masked positions are computed but meaningless; with `return_entropy`, also the
    detached per-token entropy [B, G, T].
    """
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must both be [B, P]; got {tuple(prompt_ids.shape)} and "
                         f"{tuple(prompt_mask.shape)}")
    if completion_ids.dim() != 3 or completion_mask.shape != completion_ids.shape:
        raise ValueError(f"completion_ids and completion_mask must both be [B, G, T]; got "
                         f"{tuple(completion_ids.shape)} and {tuple(completion_mask.shape)}")
    if completion_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompts but completions for {completion_ids.shape[0]} "
                         f"(completion_ids must be [B, G, T] with B = prompts)")
    empty_prompts = (prompt_mask.sum(-1) == 0).nonzero().flatten()
    if empty_prompts.numel():
        raise ValueError(f"prompts {empty_prompts.tolist()[:10]} have no real token (prompt_mask all 0): the first "
                         f"completion token must be conditioned on at least one")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    num_prompts, group_size, num_targets = completion_ids.shape
    causal_lm = causal_lm_of(model)

    if not supports_shared_prefix(causal_lm):
        rows = num_prompts * group_size
        input_ids = torch.cat([prompt_ids.repeat_interleave(group_size, dim=0), completion_ids.reshape(rows, -1)], 1)
        attention_mask = torch.cat([prompt_mask.repeat_interleave(group_size, dim=0),
                                    completion_mask.reshape(rows, -1).to(prompt_mask.dtype)], dim=1)
        return _grouped(token_logprobs(model, input_ids, attention_mask, completion_start=prompt_ids.shape[1],
                                       temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size),
                        num_prompts, group_size)

    from transformers import AttentionInterface, DynamicCache

    decoder = causal_lm.get_decoder()
    cache = DynamicCache(config=causal_lm.config)
    prompt_hidden = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                            position_ids=position_ids_from_mask(prompt_mask), use_cache=True,
                            **cache_argument(decoder, cache)).last_hidden_state
    # The last prompt position is a real token (left padding): it predicts completion token 0.
    last_prompt_hidden = prompt_hidden[:, -1:].repeat_interleave(group_size, dim=0)  # [B*G, 1, H]
    rows = num_prompts * group_size
    flat_ids = completion_ids.reshape(rows, num_targets)
    flat_mask = completion_mask.reshape(rows, num_targets)
    hidden = last_prompt_hidden
    if num_targets > 1:
        inputs, input_mask = flat_ids[:, :-1], flat_mask[:, :-1].bool()
        positions = prompt_mask.sum(-1).repeat_interleave(group_size)[:, None] + input_mask.long().cumsum(-1) - 1
        prefix = _PromptPrefix(keys=[layer.keys for layer in cache.layers],
                               values=[layer.values for layer in cache.layers],
                               prompt_mask=prompt_mask.bool(), completion_mask=input_mask, group_size=group_size)
        AttentionInterface.register(GROUPED_PREFIX_ATTENTION, grouped_prefix_attention)
        with _attention_implementation(causal_lm.config, GROUPED_PREFIX_ATTENTION):
            completion_hidden = decoder(input_ids=inputs, attention_mask=None, position_ids=positions.clamp(min=0),
                                        use_cache=False, prompt_prefix=prefix).last_hidden_state
        if prefix.calls != len(cache.layers):
            raise RuntimeError(f"{type(causal_lm).__name__} did not route its attention through the shared-prefix "
                               f"attention; compute log-probs with token_logprobs (share_prefix off)")
        hidden = torch.cat([last_prompt_hidden, completion_hidden], dim=1)
    return _grouped(_score_hidden(causal_lm, hidden, flat_ids, temperature, return_entropy, chunk_size),
                    num_prompts, group_size)


def _grouped(result: Tensor | tuple[Tensor, Tensor], num_prompts: int, group_size: int
             ) -> Tensor | tuple[Tensor, Tensor]:
    """[B*G, T] (or a pair of them) as [B, G, T]."""
    if isinstance(result, tuple):
        return tuple(part.view(num_prompts, group_size, -1) for part in result)  # type: ignore[return-value]
    return result.view(num_prompts, group_size, -1)
