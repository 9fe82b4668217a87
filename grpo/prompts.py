"""The GRPO training prompts: rendering the data, the per-step order, and what a run trained on."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from grpo.checkpoint import latest_checkpoint
from grpo.flags import GRPOConfig


@dataclasses.dataclass
class Prompt:
    """One training prompt: the sample (for its target) and its rendered prompt ids."""

    sample: Any  # data.types.Sample
    prompt_ids: list[int]


def build_prompts(config: GRPOConfig, tokenizer: Any, log: Callable[[str], None] = print) -> list[Prompt]:
    """Render every training sample as a generation prompt; count (and log) what had to be cut.

    Unreadable data (a missing file, a malformed row) stops the run with the loader's message,
    which names the file, the row and the field.
    """
    from data import load_dataset, make_samples
    from data.loaders import DataError
    from data.render import render_each, render_prompt

    try:
        conversations, stats = load_dataset(config.data, seed=config.seed, format=config.data_format)
    except (DataError, ValueError) as error:
        raise SystemExit(f"--data {config.data}: {error}") from None
    samples = make_samples(conversations, strip_reasoning=True, format_instructions=config.format_prompt)
    without_action = sum(not any(turn.is_action for turn in conversation.turns) for conversation in conversations)
    rendered = render_each(samples, lambda sample: render_prompt(sample, tokenizer, max_length=config.max_prompt_length),
                           log, log_prefix="skipped prompt")
    prompts = [Prompt(sample=samples[index], prompt_ids=prompt.input_ids) for index, prompt in rendered.kept]
    too_long, shortened = rendered.too_long, rendered.shortened
    log(
        f"data {config.data}: {len(conversations)} conversations ({without_action} without an assistant action), "
        f"{len(samples)} samples, {len(prompts)} prompts ({shortened} shortened, {too_long} skipped as too long "
        "even after dropping history)"
    )
    if not prompts:
        reason = ("no conversation has an assistant action" if not samples
                  else f"all {len(samples)} exceed --max-prompt-length {config.max_prompt_length}")
        raise SystemExit(f"--data {config.data}: no usable prompts ({reason})")
    return prompts


def prompt_batches(num_prompts: int, per_step: int, *, seed: int, start_step: int) -> Any:
    """Yield (step, prompt indices) forever: seeded reshuffles per epoch, resumable from any step."""
    from data.batching import batch_indices

    per_epoch = max(1, num_prompts // per_step)
    step = start_step
    while True:
        epoch, position = divmod(step, per_epoch)
        batches = batch_indices(num_prompts, per_step, seed=seed, epoch=epoch, shuffle=True, drop_last=True)
        if not batches:  # fewer prompts than one step needs: reuse them with replacement order
            batches = [[i % num_prompts for i in range(per_step)]]
        yield step, batches[position % len(batches)]
        step += 1


def trained_samples(run_dir: str | Path) -> list[Any]:
    """The samples a GRPO run has trained on so far, in training order (step 1's prompts first).

    Rebuilt from the run's config.json and the tokenizer of its newest checkpoint, with the same
    prompt list and `prompt_batches` order as the run, up to the checkpoint's step; with
    --oversample, every sampled prompt (kept or not).  Lets `eval.run --data trained:RUN_DIR`
    ask whether RL changed the decisions on its own training prompts (optimisation) or only
    failed to carry them to the test split (generalisation).
    """
    import json

    from grpo.checkpoint import load_trainer_state
    from grpo.config import config_from_dict
    from grpo.policy import load_tokenizer

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir} is not a GRPO run directory (no config.json)")
    config = config_from_dict(GRPOConfig, json.loads(config_path.read_text()))
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ValueError(f"{run_dir} has no checkpoint yet: nothing has been trained")
    steps = int(load_trainer_state(checkpoint)["step"])
    prompts = build_prompts(config, load_tokenizer(checkpoint), log=lambda message: None)
    order: list[int] = []
    for step, indices in prompt_batches(len(prompts), config.prompts_per_step * config.oversample,
                                        seed=config.seed, start_step=0):
        if step >= steps:
            break
        order.extend(indices)
    return [prompts[index].sample for index in order]
