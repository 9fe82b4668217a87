"""Per-turn evaluation: decode every test turn once, score it, and print the paper's table.

    python -m eval.run --checkpoint sft=runs/default/sft-base --checkpoint rl=runs/default/grpo \\
        --data synthetic:test --data synthetic:ood_test --out runs/eval
    python -m eval.run --checkpoint base --model Qwen/Qwen3-1.7B \\
        --data tau-airline=../shared/data/tau-bench-airline/trajectories.json --limit 200 --out runs/eval-tau
    python -m eval.run --checkpoint untrained=base,rl=runs/grpo --model runs/default/base-tiny --data synthetic:test
    python -m eval.run --checkpoint coldstart=runs/default/coldstart,rl=runs/default/grpo \\
        --data trained:runs/default/grpo --limit 400 --out runs/eval-trained   # RL's own training prompts

`--checkpoint NAME=PATH` may be repeated, list several pairs after one flag, or join them with
commas (so may `--data`, whose items may be named too, `--data tau=PATH`; paths must not contain
commas).  PATH is a checkpoint written by
`grpo.policy.save_policy` (its lineage of adapters is merged into the base), a run directory (its
newest checkpoint), a plain model directory or hub name, or the word `base`, which stands for
`--model` (a model with no training).  `--checkpoint base` alone means `base=base`.

For every checkpoint and every split, each test turn (one `data.Sample`: the gold history up to an
assistant action) is rendered as a generation prompt, decoded once with the project's own sampler
(`grpo.rollout.generate`; greedy unless --no-greedy), parsed and scored with `rewards`, and the
turns are aggregated into the table of `eval.metrics` (DESIGN.md, "Evaluation: the paper's table").

Writes into --out:
    results.json                         every number per split and checkpoint, plus the config
    results.md                           the table, one row per checkpoint, one table per split
    predictions-<checkpoint>-<split>.jsonl   every prediction with its target, parse and reward

With two or more checkpoints, results.json ("paired") and results.md also hold each checkpoint's
difference from the one listed before it, turn by turn on the same turns, for action accuracy,
R_acc and reward: the mean difference and its paired standard error (`eval.metrics.paired_difference`),
and where the action-accuracy change comes from: turns whose malformed output became a right action
(invalid->right) versus turns whose well-formed decision changed (wrong->right, right->wrong).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from eval.evaluate import evaluate
from eval.report import paired_differences, results_markdown
from grpo.config import config_to_dict, field, parse_config

# Flags whose values accumulate: repeated, several values after one flag, or comma-separated.
LIST_FLAGS: tuple[str, ...] = ("--checkpoint", "--data")
BASE_KEYWORD = "base"


@dataclasses.dataclass
class EvalConfig:
    """Every knob of an evaluation run (one flag each; see the module docstring for examples)."""

    checkpoint: str = field("", "NAME=PATH pairs to evaluate (repeat the flag or separate with commas); "
                                "PATH 'base' means --model")
    model: str | None = field(None, "the plain model evaluated for PATH 'base': hub name, folder, .gguf file or 'smollm2'")
    data: str = field("synthetic:test", "test sets: paths, synthetic:<split> or trained:GRPO_RUN_DIR (the prompts "
                                        "that run trained on), optionally NAME=SPEC (repeat the flag or use commas)")
    data_format: str | None = field(None, "force the data format: apigen, tau or almita")
    format_prompt: bool = field(False, "end every system prompt with the output-format instructions "
                                       "(data.format.FORMAT_INSTRUCTIONS)")
    limit: int = field(0, "evaluate at most N turns per split, a seeded random subset in data order "
                          "(trained:RUN: the first N in training order; 0: all)")
    out: str = field("runs/eval", "output directory")
    seed: int = field(0, "seed of the synthetic data, the --limit subset and sampling")
    batch_size: int = field(16, "prompts decoded together (grouped by similar prompt length)")
    max_new_tokens: int = field(128, "completion token limit")
    max_prompt_length: int = field(1024, "prompt token limit; older turns are dropped beyond it, and a prompt "
                                         "that does not fit even then is skipped (and counted)")
    greedy: bool = field(True, "greedy decoding (--no-greedy samples with --temperature/--top-p/--top-k)")
    temperature: float = field(1.0, "sampling temperature (--no-greedy)")
    top_p: float = field(1.0, "nucleus sampling threshold (--no-greedy)")
    top_k: int = field(0, "top-k sampling, 0 off (--no-greedy)")
    similarity: str = field("default", "answer similarity: default (all-MiniLM-L6-v2), a model name/path, or lexical")
    length_reward: bool = field(True, "include the thinking-length reward in the reported total")
    device: str = field("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = field("auto", "float32, bfloat16, float16 or auto (bf16 on GPUs and fast-bf16 CPUs: runtime.auto_dtype)")
    threads: int = field(0, "CPU threads for torch (0: torch's default)")
    trust_remote_code: bool = field(False, "allow model repositories to run their own code")
    progress: bool = field(True, "show a progress bar")


# ---------------------------------------------------------------------------------------------
# Command line: NAME=PATH pairs and split names
# ---------------------------------------------------------------------------------------------


def gather_list_flags(argv: Sequence[str], flags: Sequence[str] = LIST_FLAGS) -> list[str]:
    """Rewrite repeated / multi-valued list flags as one comma-separated flag each.

    ["--data", "a", "b", "--data=c", "--limit", "3"] -> ["--limit", "3", "--data", "a,b,c"].
    A list flag takes every following argument up to the next one starting with "--".
    """
    gathered: dict[str, list[str]] = {}
    rest: list[str] = []
    index = 0
    while index < len(argv):
        argument = argv[index]
        flag, equals, inline = argument.partition("=")
        if flag in flags:
            values = gathered.setdefault(flag, [])
            if equals:
                values.append(inline)
            index += 1
            while index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
            if not equals and not values:
                rest.append(flag)  # let argparse report the missing value
            continue
        rest.append(argument)
        index += 1
    for flag, values in gathered.items():
        if values:
            rest += [flag, ",".join(values)]
    return rest


def split_list(text: str) -> list[str]:
    """Comma-separated items, stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_checkpoints(text: str, model: str | None) -> dict[str, str]:
    """{name: path} from "NAME=PATH,NAME=PATH" (PATH 'base' -> --model; a lone 'base' is base=base).

    With no pairs and a --model, the model alone is evaluated as "base".
    """
    pairs: dict[str, str] = {}
    for item in split_list(text):
        name, equals, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not equals:
            if name != BASE_KEYWORD:
                raise ValueError(f"--checkpoint {item!r}: expected NAME=PATH (or 'base' together with --model)")
            path = BASE_KEYWORD
        if not name or not path:
            raise ValueError(f"--checkpoint {item!r}: both NAME and PATH are needed")
        if name in pairs:
            raise ValueError(f"--checkpoint: the name {name!r} is given twice")
        if path == BASE_KEYWORD:
            if not model:
                raise ValueError(f"--checkpoint {item!r}: PATH 'base' means the --model, but no --model was given")
            path = model
        pairs[name] = path
    if not pairs:
        if not model:
            raise ValueError("nothing to evaluate: give --checkpoint NAME=PATH (repeatable) or --model M")
        pairs[BASE_KEYWORD] = model
    return pairs


def split_names(specs: Sequence[str]) -> dict[str, str]:
    """{split name: spec}.  "NAME=SPEC" names a split; otherwise synthetic:test -> "test" and a path
    -> its file (or folder) name without suffix.  Repeated names get "-2", "-3", ...
    """
    names: dict[str, str] = {}
    for item in specs:
        given, equals, rest = item.partition("=")
        if equals and given and safe_name(given) == given:
            name, spec = given, rest
        elif item.startswith("synthetic:"):
            name, spec = item.split(":", 1)[1], item
        elif item.startswith("trained:"):
            name, spec = "trained", item
        else:
            path = Path(item.rstrip("/"))
            name, spec = (path.stem if path.suffix else path.name), item
        name = safe_name(name) or "data"
        unique, count = name, 1
        while unique in names:
            count += 1
            unique = f"{name}-{count}"
        names[unique] = spec
    return names


def safe_name(text: str) -> str:
    """`text` with everything but letters, digits, '.', '_' and '-' replaced by '_' (for file names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def predictions_path(out: Path, checkpoint: str, split: str) -> Path:
    return out / f"predictions-{safe_name(checkpoint)}-{safe_name(split)}.jsonl"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_samples(spec: str, *, seed: int, limit: int, data_format: str | None = None,
                 format_prompt: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """The test turns of one data source, and what loading them found.

    With `limit` > 0, a random subset of `limit` turns (seeded, so every checkpoint sees the same
    turns) is kept in data order: the first N turns would cover only the first few conversations.
    """
    from data import load_dataset, make_samples

    if spec.startswith("trained:"):  # the prompts a GRPO run trained on: the first `limit`, in training order
        from grpo.prompts import trained_samples

        trained = trained_samples(spec.removeprefix("trained:"))
        samples = trained[:limit] if limit else trained
        return samples, {"spec": spec, "conversations": len({s.conversation_id for s in samples}),
                         "turns_available": len(trained), "turns": len(samples)}
    conversations, stats = load_dataset(spec, seed=seed, format=data_format)
    samples = make_samples(conversations, format_instructions=format_prompt)
    info: dict[str, Any] = {"spec": spec, "conversations": len(conversations), "turns_available": len(samples)}
    as_dict = getattr(stats, "as_dict", None)
    if callable(as_dict):
        info["load_stats"] = as_dict()
    if limit and limit < len(samples):
        kept = sorted(random.Random(seed).sample(range(len(samples)), limit))
        samples = [samples[index] for index in kept]
    info["turns"] = len(samples)
    return samples, info


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------


def resolve_model_path(path: str) -> tuple[str, str]:
    """("init" | "base", location) for a --checkpoint PATH.

    A directory with lineage.json is a policy checkpoint; a run directory (with checkpoints/)
    stands for its newest checkpoint; any other directory, or a hub name, is a plain model; a
    `.gguf` file or `smollm2` is converted to a plain model folder (grpo.models.resolve_model).
    """
    from grpo.checkpoint import latest_checkpoint
    from grpo.models import needs_conversion, resolve_model
    from grpo.policy import LINEAGE_FILE

    if needs_conversion(path):  # converted once into a plain folder
        return "base", resolve_model(path)
    location = Path(path).expanduser()
    if (location / LINEAGE_FILE).is_file():
        return "init", str(location)
    if (location / "checkpoints").is_dir():
        newest = latest_checkpoint(location)
        if newest is None:
            raise FileNotFoundError(f"--checkpoint {path}: a run directory without a complete checkpoint")
        return "init", str(newest)
    if location.is_dir():
        if not (location / "config.json").is_file():
            raise FileNotFoundError(f"--checkpoint {path}: neither a checkpoint (lineage.json), a run directory "
                                    f"(checkpoints/) nor a model directory (config.json)")
        return "base", str(location)
    if path.startswith(("/", ".", "~")) or location.suffix:
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    return "base", path  # a hub name


def load_for_eval(resolved: tuple[str, str], config: EvalConfig) -> Any:
    """A Policy without a fresh adapter (lora=None) from `resolve_model_path`'s answer: a
    checkpoint's lineage merged into its base, or a plain model."""
    from grpo.policy import load_policy
    from grpo.runtime import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    kind, location = resolved
    arguments = {"init": location} if kind == "init" else {"base": location}
    policy = load_policy(**arguments, lora=None, dtype=dtype, device=str(device), trust_remote_code=config.trust_remote_code)
    policy.model.requires_grad_(False)  # lora=None makes every weight trainable; evaluation needs none
    return policy

def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate every checkpoint on every split, write the outputs, print the table; returns results.json's dict."""
    import torch

    import rewards

    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        checkpoints = parse_checkpoints(config.checkpoint, config.model)
        # Every path is checked before the first (possibly long) evaluation starts.
        locations = {name: resolve_model_path(path) for name, path in checkpoints.items()}
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"eval.run: {error}") from None
    specs = split_list(config.data)
    if not specs:
        raise SystemExit("--data: no test set given")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    reward_config = rewards.RewardConfig(use_length=config.length_reward, similarity=config.similarity)
    similarity = rewards.get_similarity(config.similarity, lexical_ok=config.similarity == "lexical")

    splits: dict[str, dict[str, Any]] = {}
    samples_of: dict[str, list[Any]] = {}
    for split, spec in split_names(specs).items():
        try:
            samples_of[split], splits[split] = load_samples(spec, seed=config.seed, limit=config.limit,
                                                           data_format=config.data_format,
                                                           format_prompt=config.format_prompt)
        except (ValueError, OSError) as error:  # data.DataError is a ValueError naming the bad row
            raise SystemExit(f"eval.run: --data {spec}: {error}") from None
        print(f"[eval] {split}: {splits[split]['turns']} turns from {splits[split]['conversations']} conversations ({spec})")

    results: dict[str, dict[str, dict[str, Any]]] = {split: {} for split in splits}
    predictions_of: dict[str, dict[str, list[dict[str, Any]]]] = {split: {} for split in splits}
    for name in checkpoints:
        began = time.perf_counter()
        policy = load_for_eval(locations[name], config)
        print(f"[eval] {name}: loaded {locations[name][1]} in {time.perf_counter() - began:.1f}s")
        for split, samples in samples_of.items():
            metrics, predictions = evaluate(
                policy, samples, batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                similarity=similarity, reward_config=reward_config, max_prompt_length=config.max_prompt_length,
                greedy=config.greedy, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                seed=config.seed, progress=f"{name} {split}" if config.progress else False,
                log=lambda message: print(f"[eval] {name} {split}: {message}"),
            )
            results[split][name] = metrics
            predictions_of[split][name] = predictions
            with predictions_path(out, name, split).open("w") as handle:
                for prediction in predictions:
                    handle.write(json.dumps({"checkpoint": name, "split": split, **prediction},
                                            ensure_ascii=False, default=_json_default) + "\n")
        del policy  # free this model before the next one is loaded

    summary = {
        "config": config_to_dict(config),
        "checkpoints": checkpoints,
        "loaded": {name: {"as": kind, "location": location} for name, (kind, location) in locations.items()},
        "splits": splits,
        "results": results,
        "paired": paired_differences(predictions_of),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    table = results_markdown(results, splits, summary["paired"])
    (out / "results.md").write_text(table)
    print(table)
    return summary


def _json_default(value: Any) -> Any:
    """Values JSON does not know (e.g. a Path in a target's arguments) are written as text."""
    return str(value)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = gather_list_flags(sys.argv[1:] if argv is None else list(argv))
    config = parse_config(EvalConfig, arguments, description=__doc__)
    run_eval(config)


if __name__ == "__main__":
    main()
