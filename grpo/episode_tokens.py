"""The token ids of a multi-turn episode, built once per message and never re-rendered.

An episode is one token sequence that only ever grows at its end:

    [first prompt] [turn 1, as sampled] [segment 1] [turn 2, as sampled] [segment 2] ... [turn n, as sampled]

* first prompt (`episode_task`): the per-turn pipeline's prompt of the task's first action, made
  the way every training and evaluation prompt is made (`data.samples.make_samples` on the task's
  conversation, `data.render.render_prompt`): the tokenizer's chat template when it has one, the
  project's ChatML otherwise, `--format-prompt`'s FORMAT_INSTRUCTIONS when on.  So the model sees
  the format it saw in SFT and in per-turn GRPO.
* turn k: the ids the sampler drew, as drawn.  They are never decoded and encoded again (that can
  give other ids for the same text: re-tokenization drift), and earlier turns are never rendered
  again, so a think block stays in the sequence exactly as sampled, even where the chat template
  would drop it from a re-rendered history (Qwen3's drops every think block before the last user
  message; the project's ChatML shows history actions with an empty think block).  The model sees
  its own earlier reasoning.
* segment k (`message_segment`): the environment's message (a tool result, or the user's reply)
  as the template writes it, followed by the header of the next assistant turn.  It starts with the
  template's end of the assistant turn (`<|im_end|>\\n` in ChatML) unless the sampler already drew
  that token (a turn that stopped on its end-of-turn token keeps it as sampled; a turn that stopped
  on `</tool_call>` or `</answer>`, or ran out of tokens, gets it here, as an environment token).

How a segment is found, for any template: render (`data.chat_text.prompt_text`, the renderer of
every prompt in the project) a short conversation [user, assistant, message] with the generation
prompt, where the assistant's answer is a sentinel string, and take the text after the sentinel's
answer block.  In ChatML, for a tool result:

    <|im_end|>\\n<|im_start|>user\\n<tool_response>\\n{"id":1}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n

That text is encoded once (`data.render.encode_text`) and appended.  One check runs with each
segment: the generation prompt after which the model sampled ([user] rendered with it) must be a
prefix of the rendering of [user, assistant, message], i.e. the template starts an assistant turn
in history exactly as it prompts for one, so the sampled turn sits where a re-render would put it.
A template that prompts differently (one that pre-fills an empty think block in its generation
prompt, for instance) is refused with a ValueError instead of training on a sequence no render
gives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from data.format import ANSWER_CLOSE
from data.types import Turn

# The assistant's answer in the rendering a segment is cut from (any text the template copies verbatim).
SENTINEL = "episode-segment-sentinel-q7x"
ROLES = {"observation": "tool", "human": "user"}  # data.synthetic.env.Step.role -> data.types.Turn.role


@dataclasses.dataclass(frozen=True)
class EpisodeTask:
    """A task with what the policy sees at its start and the gold actions its turns are scored against."""

    task: Any  # data.synthetic.env.Task
    system: str  # the system text the policy sees (--format-prompt's instructions included)
    tools: list[dict[str, Any]]  # the tool schemas, as the renderer takes them
    opening: str  # the user's first message
    prompt_ids: list[int]  # [P] the first prompt, ending with the assistant header
    gold_targets: list[dict[str, Any]]  # the scripted assistant's actions as reward targets, in order


def episode_task(task: Any, tokenizer: Any, *, format_prompt: bool = False) -> EpisodeTask:
    """The task's first prompt, rendered exactly as the per-turn pipeline renders its first sample."""
    from data.render import render_prompt
    from data.samples import make_samples
    from data.source_apigen import parse_apigen_rows
    from data.synthetic.env import Environment

    row = {"id": task.id, "domain": task.domain, "system": task.system, "tools": task.tools,
           "conversations": [dict(entry) for entry in task.gold]}
    conversations, _ = parse_apigen_rows([row], source="<task>")
    samples = make_samples(conversations, strip_reasoning=True, format_instructions=format_prompt)
    first, opening = samples[0], Environment().reset(task).user
    if [(turn.role, turn.content) for turn in first.context] != [("user", opening)]:
        raise ValueError(f"task {task.id}: the gold conversation does not open with the environment's first user "
                         "message alone")
    return EpisodeTask(task, first.system, first.tools, opening, render_prompt(first, tokenizer).input_ids,
                       [sample.target for sample in samples])


def segment_text(tokenizer: Any, system: str, tools: list[dict[str, Any]], message: Turn) -> str:
    """The text after an assistant turn's content, up to the next assistant turn's content:
    the end of the assistant turn, `message` (a "tool" or "user" Turn), the next assistant header."""
    from data.chat_text import prompt_text

    opening = Turn("user", content="Hello.")
    history = [opening, Turn("assistant", content=SENTINEL), message]
    rendered = prompt_text(tokenizer, system, tools, history, "episode-segment")
    prompt = prompt_text(tokenizer, system, tools, [opening], "episode-segment")
    if not rendered.startswith(prompt):
        raise ValueError("the chat template starts an assistant turn in history differently from its generation "
                         "prompt: a sampled turn appended after the generation prompt would not be where a render "
                         f"puts it.  Generation prompt ends {prompt[-60:]!r}; history renders "
                         f"{rendered[len(prompt) - 60:len(prompt) + 20]!r}")
    marker = SENTINEL + ANSWER_CLOSE
    if rendered.count(marker) != 1:
        raise ValueError(f"the chat template does not show an assistant answer verbatim ({marker!r} appears "
                         f"{rendered.count(marker)} times in {rendered[-300:]!r})")
    return rendered[rendered.index(marker) + len(marker):]


def message_segment(tokenizer: Any, task: EpisodeTask, role: str, text: str, *, tool_name: str | None = None,
                    last_sampled: int | None = None) -> list[int]:
    """The ids that follow a sampled turn: `segment_text` for the environment's message of `role`
    ("observation" or "human"), encoded once; its first token is left out when it is the token the
    sampler drew last (`last_sampled`: the stop token the turn ended with, None when it ended on a
    stop sequence or ran out of tokens), so an end-of-turn token stays as sampled and is not doubled."""
    from data.render import encode_text

    turn = Turn(ROLES[role], content=text, name=tool_name if role == "observation" else None)
    ids = encode_text(tokenizer, segment_text(tokenizer, task.system, task.tools, turn))
    return ids[1:] if ids and last_sampled is not None and ids[0] == last_sampled else ids
