"""The policy layer: load a causal LM, attach LoRA, chain training stages, save checkpoints.

Shared by `grpo`, `sft` and `eval`.  Three things live here:

1. Loading.  `load_base_model` opens any Hugging Face causal LM by hub name or local directory
   (safetensors only, `trust_remote_code` off unless asked); `grpo.tiny.build_tiny_model` builds
   the small random Qwen3 of tests and `--model tiny`.

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

Scoring tokens under a policy (`token_logprobs`, `grouped_token_logprobs`) lives in
`grpo.logprobs`; what the code assumes about transformers models (the causal LM inside a
PeftModel, the KV-cache keyword, positions under left padding, which families can share a
prompt's keys and values) lives in `grpo.hf_compat`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

LINEAGE_FILE = "lineage.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"


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


# ----------------------------------------------------------------------------------------------
# Loading models
# ----------------------------------------------------------------------------------------------


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
