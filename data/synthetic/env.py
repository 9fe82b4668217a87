"""A conversation environment over the synthetic world: an agent acts, tools run, a scripted user replies.

The split rows teach one action at a time.  GRPO over whole conversations (tau-bench's setting)
needs the world itself: a task, an agent that acts until the user is done, and a verdict.  This
module gives that, with no model code:

    tasks = generate_tasks(seed=0, n_test=200)["test"]      # task i = conversation i of the split
    env = Environment(max_turns=30)
    start = env.reset(tasks[0])          # start.system (the policy), start.tools (JSON), start.user
    step = env.step({"name": "get_order", "arguments": {"order_id": "O1234"}})   # a tool call
    step = env.step("Order O1234 is pending. Shall I cancel it?")                 # an answer
    ...                                  # until step.done
    record = env.episode()               # success, turns, invalid actions, violations, transcript

A **task** is one scripted conversation of `generate_splits` seen from the other side: the start
database, the user's goal (`data/synthetic/user.py`: who the user is, what they ask for, which
change they accept or turn down, their scripted answers), the gold final database (the script's
database at its end), and the outputs the agent must say.  Tasks come from the same random streams
as the rows (`generate_dialogues`), so `generate_tasks(seed, **sizes)[split][i]` is row i of
`generate_splits(seed, **sizes)[split]`; pass the same sizes (a later split skips conversations
equal to an earlier split's).

A **step** takes the action a model emitted, already parsed:

* a tool call `{"name": str, "arguments": dict}` runs against the episode's database (copy-on-write,
  writes change what later calls see) and returns its result as the rows' observations do (compact
  JSON).  These come back as `{"error": ...}` instead, and are counted: an unknown tool or
  arguments that fail the tool's schema (invalid actions); an account tool before a successful
  authentication, and a write whose preceding turn was not the user's explicit yes (policy
  violations: the environment refuses them, the database does not change).
* a string is an answer to the user; the simulated user replies (or is done).
* anything else (the parser found no action, `None`) is an unparseable action: counted, nothing
  enters the transcript, the caller decides what the model sees next.

The episode ends when the user is done (every request answered) or after `max_turns` actions.

**Success** is tau-bench's rule: the final database equals the gold one, and every required output
appears in the agent's answers.  The required outputs of a request are the values from tool results
(ids, amounts as `$12.50`, statuses, dates, names...) that the script's last answer to it states,
matched as whole tokens, case-insensitive (`user.said`).  A write the user turned down, or one the
policy forbids, is not in the gold database, so doing it fails the task.

The record's transcript holds APIGen entries (`{"from": "human"|"gpt"|"function_call"|
"observation", "value": str}`) and `Episode.as_row()` makes a row that `data.source_apigen` reads,
so the project's renderer shows an episode like any conversation.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from data.synthetic import DOMAINS, generate_dialogues
from data.synthetic.user import SimulatedUser, UserGoal, said, user_goal
from data.synthetic.world import Db, Dialogue, money, validate

Action = Any  # dict {"name", "arguments"} (tool call), str (answer), anything else (unparseable)
INVALID = ("unparseable", "unknown_tool", "bad_arguments")
VIOLATIONS = ("not_authenticated", "unconfirmed_write")
UNSTATED_KEYS = ("month",)  # result fields whose words ("current") a gold answer uses in passing

# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    id: str
    split: str
    domain: str
    system: str                        # the domain policy (the rows' "system")
    tools: str                         # the tool schemas as the rows' JSON string
    start_db: Db
    gold_db: Db                        # the scripted conversation's database at its end
    user: UserGoal
    outputs: tuple[str, ...]           # what the agent must say (see the module docstring)
    gold: tuple[dict[str, str], ...]   # the scripted conversation: the split row's entries

    @property
    def facts(self) -> dict[str, Any]:
        """What the user knows: its account facts, and per request what it says (ids, items...)."""
        return {**self.user.identity,
                "requests": [[request.opening] + [text for _, text in request.answers] for request in self.user.requests]}

    def gold_actions(self) -> list[Action]:
        """The scripted assistant's actions, in order: tool calls as dicts, answers as strings."""
        return [json.loads(entry["value"]) if entry["from"] == "function_call" else entry["value"]
                for entry in self.gold if entry["from"] in ("function_call", "gpt")]


def _scalars(value: Any, key: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [pair for name, item in value.items() for pair in _scalars(item, name)]
    if isinstance(value, list):
        return [pair for item in value for pair in _scalars(item, key)]
    return [(key, value)]


def _surface(value: Any, text: str) -> str | None:
    """How `text` writes a tool-result value, if it does: amounts as money first, then plainly."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        forms = [money(value), f"{value:g}", str(value)]
    else:
        forms = [str(value)] if len(str(value)) > 1 else []
    return next((form for form in forms if said(text, form)), None)


def required_outputs(entries: list[dict[str, Any]], request_starts: list[int]) -> tuple[str, ...]:
    """Per request, the tool-result values (of the conversation so far) its last answer states."""
    outputs: list[str] = []
    bounds = list(request_starts) + [len(entries)]
    for end in bounds[1:]:
        answers = [entry["value"] for entry in entries[:end] if entry["from"] == "gpt"]
        if not answers or entries[end - 1]["from"] != "gpt":
            continue
        final = answers[-1]
        for entry in entries[:end]:
            if entry["from"] != "observation":
                continue
            for key, value in _scalars(json.loads(entry["value"])):
                form = None if key in UNSTATED_KEYS else _surface(value, final)
                if form is not None and form not in outputs:
                    outputs.append(form)
    return tuple(outputs)


def task_from(split: str, row: dict[str, Any], dialogue: Dialogue) -> Task:
    """The task of one split row and the dialogue that scripted it."""
    return Task(row["id"], split, row["domain"], row["system"], row["tools"], dialogue.start_db, dialogue.db,
                user_goal(dialogue), required_outputs(dialogue.entries, dialogue.request_starts),
                tuple({"from": entry["from"], "value": entry["value"]} for entry in dialogue.entries))


def generate_tasks(seed: int = 0, n_train: int = 1000, n_test: int = 200, n_ood: int = 200,
                   n_coldstart: int = 100) -> dict[str, list[Task]]:
    """One task per row of `generate_splits(seed, ...)` with the same arguments, split by split."""
    dialogues = generate_dialogues(seed, n_train, n_test, n_ood, n_coldstart)
    return {split: [task_from(split, row, dialogue) for row, dialogue in pairs] for split, pairs in dialogues.items()}


# ----------------------------------------------------------------------------- the environment


@dataclass(frozen=True)
class Start:
    system: str   # the domain policy
    tools: str    # the tool schemas, the JSON string the rows carry
    user: str     # the user's first message


@dataclass(frozen=True)
class Step:
    role: str | None    # "observation" (a tool result) or "human" (the user's reply); None: nothing
    text: str | None
    done: bool
    error: str | None = None  # the kind of invalid or refused action (INVALID + VIOLATIONS), if any


@dataclass(frozen=True)
class Episode:
    task_id: str
    success: bool
    db_match: bool                     # the final database equals the gold one
    missing_outputs: tuple[str, ...]   # required outputs no agent answer stated
    turns: int                         # agent actions taken (unparseable ones included)
    user_done: bool                    # the user ended the episode (False: the turn limit, or not over)
    invalid_actions: int               # unparseable, unknown tool, bad arguments
    policy_violations: int             # refused: not authenticated, write without a yes just before
    errors: dict[str, int]             # the counts per kind
    transcript: list[dict[str, str]]   # APIGen entries, the user's first message included
    system: str
    tools: str
    domain: str

    def as_row(self) -> dict[str, Any]:
        """An APIGen-MT row of the episode (for `data.source_apigen.parse_apigen_rows` and the renderer)."""
        return {"id": self.task_id, "domain": self.domain, "system": self.system, "tools": self.tools,
                "conversations": [dict(entry) for entry in self.transcript]}


class Environment:
    """One episode at a time over a `Task`; deterministic (no randomness anywhere)."""

    def __init__(self, max_turns: int = 30) -> None:
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.max_turns = max_turns
        self.task: Task | None = None

    def reset(self, task: Task) -> Start:
        self.task = task
        self.domain = DOMAINS[task.domain]
        self.db: Db = copy.deepcopy(task.start_db)
        self.user = SimulatedUser(task.user)
        self.authenticated: str | None = None
        self.confirmed = False  # the last turn is the user's yes to a proposed change
        self.turns = 0
        self.user_done = False
        self.errors = {kind: 0 for kind in INVALID + VIOLATIONS}
        opening = self.user.opening()
        self.transcript = [{"from": "human", "value": opening}]
        return Start(task.system, task.tools, opening)

    @property
    def done(self) -> bool:
        return self.user_done or self.turns >= self.max_turns

    def step(self, action: Action) -> Step:
        """Apply one agent action; never raises on what a model emitted."""
        if self.task is None or self.done:
            raise RuntimeError("no episode in progress: call reset(task)")
        self.turns += 1
        confirmed, self.confirmed = self.confirmed, False  # a yes allows only the very next action
        if isinstance(action, str) and action.strip():
            return self._answer(action)
        if isinstance(action, dict) and isinstance(action.get("name"), str) and "arguments" in action:
            return self._call(action["name"], action["arguments"], confirmed)
        return self._error("unparseable", "could not parse an action", record=False)

    def _answer(self, text: str) -> Step:
        self.transcript.append({"from": "gpt", "value": text})
        reply = self.user.respond(text, self.db)
        if reply.done:
            self.user_done = True
            return Step(None, None, True)
        self.transcript.append({"from": "human", "value": reply.text})
        self.confirmed = reply.confirms
        return Step("human", reply.text, self.done)

    def _call(self, name: str, arguments: Any, confirmed: bool) -> Step:
        self.transcript.append({"from": "function_call",
                                "value": json.dumps({"name": name, "arguments": arguments}, default=str)})
        tool = next((tool for tool in self.domain.tools if tool.name == name), None)
        if tool is None:
            return self._error("unknown_tool", f"unknown tool {name!r}")
        problems = validate(tool.parameters, arguments)
        if problems:
            return self._error("bad_arguments", f"invalid arguments: {'; '.join(problems)}")
        if not tool.public and tool.auth_key is None and self.authenticated is None:
            return self._error("not_authenticated", f"{name} needs the user to be authenticated first")
        if tool.writes and not confirmed:
            return self._error("unconfirmed_write",
                               f"{name} changes the account: refused without the user's explicit yes just before")
        try:
            result, self.db = tool.run(self.db, arguments)
        except Exception as failure:  # a tool's own check missed an odd value: report it, do not crash the episode
            return self._error("bad_arguments", f"{name} failed: {failure!r}")
        if tool.auth_key is not None and "error" not in result:
            self.authenticated = str(result[tool.auth_key])
        text = json.dumps(result, separators=(",", ":"))
        self.transcript.append({"from": "observation", "value": text})
        return Step("observation", text, self.done)

    def _error(self, kind: str, message: str, record: bool = True) -> Step:
        self.errors[kind] += 1
        text = json.dumps({"error": message}, separators=(",", ":"))
        if record:
            self.transcript.append({"from": "observation", "value": text})
        return Step("observation" if record else None, text, self.done, kind)

    def episode(self) -> Episode:
        """The record of the episode so far (final once `done`)."""
        task = self.task
        if task is None:
            raise RuntimeError("no episode: call reset(task)")
        answers = [entry["value"] for entry in self.transcript if entry["from"] == "gpt"]
        missing = tuple(output for output in task.outputs if not any(said(answer, output) for answer in answers))
        db_match = self.db == task.gold_db
        return Episode(task.id, db_match and not missing, db_match, missing, self.turns, self.user_done,
                       sum(self.errors[kind] for kind in INVALID), sum(self.errors[kind] for kind in VIOLATIONS),
                       dict(self.errors), [dict(entry) for entry in self.transcript], task.system, task.tools,
                       task.domain)


def run_episode(env: Environment, task: Task, actions: list[Action]) -> Episode:
    """Reset on `task` and take `actions` in order until the episode ends (a replay helper)."""
    env.reset(task)
    for action in actions:
        if env.done:
            break
        env.step(action)
    return env.episode()


__all__ = ["Action", "Environment", "Episode", "Start", "Step", "Task", "generate_tasks", "required_outputs",
           "run_episode", "task_from"]
