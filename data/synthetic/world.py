"""The machinery shared by every synthetic domain: tools, databases, and the dialogue recorder.

A domain is a short policy text, a set of executable tools and a database factory.  A tool is a
JSON-schema declaration plus a pure Python function

    run(db, arguments) -> (result, db')

that computes the result from the database and returns the (possibly) updated database without
mutating the old one, so a write tool changes the state seen by every later call in the same
conversation, and a conversation can always be replayed from its starting database.

`Dialogue` records one conversation while it is being scripted.  It executes every tool call
against the current database (the observation is the JSON text of the real result) and enforces
the policy rules that every domain shares, so a scenario that breaks them fails loudly at
generation time instead of teaching the model a wrong action:

  * every tool call's arguments validate against the tool's declared JSON schema;
  * account tools (everything not marked public) need a successful authentication first;
  * a write tool needs the immediately preceding turn to be a user turn marked as a confirmation.

Every assistant action is recorded with a written reasoning string; the split builder keeps it
only for the cold-start split.  `Dialogue` also notes, without drawing any random number, where
each user request starts and every change it proposed with the user's yes or no: the environment
(`data/synthetic/env.py`) turns these notes into the scripted user's goal.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

Db = dict[str, dict[str, dict[str, Any]]]  # table name -> record key -> record
ToolResult = dict[str, Any]
ToolFunction = Callable[[Db, dict[str, Any]], tuple[ToolResult, Db]]

# ----------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tool:
    """An executable tool.

    parameters: a JSON schema of type object (properties, required, optional enums).
    writes: True when the tool changes the database (needs authentication and a confirmation).
    public: True when it may be called before authentication (catalog search, flight status...).
    auth_key: for an authentication tool, the result key that holds the verified customer id
        (a result without "error" authenticates the user).
    """

    name: str
    description: str
    parameters: dict[str, Any]
    run: ToolFunction
    writes: bool = False
    public: bool = False
    auth_key: str | None = None

    def schema(self) -> dict[str, Any]:
        """The bare `{name, description, parameters}` definition written to the APIGen `tools` field."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def params(required: dict[str, dict[str, Any]], optional: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A JSON schema of type object from required and optional property schemas."""
    properties = {**required, **(optional or {})}
    return {"type": "object", "properties": properties, "required": list(required)}


STRING: dict[str, Any] = {"type": "string"}
INTEGER: dict[str, Any] = {"type": "integer"}
NUMBER: dict[str, Any] = {"type": "number"}
BOOLEAN: dict[str, Any] = {"type": "boolean"}


def enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def replace_record(db: Db, table: str, key: str, record: dict[str, Any]) -> Db:
    """A new database equal to `db` except `db[table][key] = record` (copy-on-write, `db` untouched)."""
    return {**db, table: {**db[table], key: record}}


def error(message: str) -> ToolResult:
    return {"error": message}


# ----------------------------------------------------------------------------- schema validation

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
    "number": (int, float), "boolean": (bool,),
}


def validate(schema: dict[str, Any], value: Any, path: str = "arguments") -> list[str]:
    """Problems of `value` against the JSON-schema subset the tools use (empty list = valid).

    Checked: type (bool is not an integer or a number), enum, object required keys and no
    undeclared keys, array items, minItems, minimum/maximum.
    """
    problems: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        allowed = _JSON_TYPES[expected]
        if isinstance(value, bool) and bool not in allowed:
            return [f"{path}: expected {expected}, got boolean"]
        if not isinstance(value, allowed):
            return [f"{path}: expected {expected}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        problems.append(f"{path}: {value} < minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        problems.append(f"{path}: {value} > maximum {schema['maximum']}")
    if expected == "object":
        properties = schema.get("properties", {})
        problems += [f"{path}: missing required key {key!r}" for key in schema.get("required", []) if key not in value]
        problems += [f"{path}: undeclared key {key!r}" for key in value if key not in properties]
        for key, item in value.items():
            if key in properties:
                problems += validate(properties[key], item, f"{path}.{key}")
    if expected == "array":
        if len(value) < schema.get("minItems", 0):
            problems.append(f"{path}: fewer than {schema['minItems']} items")
        for index, item in enumerate(value):
            problems += validate(schema.get("items", {}), item, f"{path}[{index}]")
    return problems


# ----------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class Domain:
    """A customer-service domain.

    make_db(rng) builds a fresh small database for one conversation (the customer the
    conversation is about, their records, and the domain's fixed catalog).  script(dialogue)
    writes one whole conversation on a `Dialogue` over that database, drawing its choices from
    `dialogue.rng`.
    """

    name: str
    policy: str
    tools: tuple[Tool, ...]
    make_db: Callable[[random.Random], Db]
    script: Callable[["Dialogue"], None]

    def tool(self, name: str) -> Tool:
        for tool in self.tools:
            if tool.name == name:
                return tool
        raise KeyError(f"domain {self.name!r} has no tool {name!r}")

    def tools_json(self) -> str:
        """The APIGen-MT `tools` field: a JSON string of the bare tool definitions."""
        return json.dumps([tool.schema() for tool in self.tools])


# ----------------------------------------------------------------------------- dialogue recorder


@dataclass(frozen=True)
class Proposal:
    """A write the assistant proposed (`entry`: the index of its answer in the entries) and the
    user's decision: `accepted` (a yes, then the write ran) or not (a no, nothing changed)."""

    entry: int
    tool: str
    arguments: dict[str, Any]
    accepted: bool


class PolicyViolation(RuntimeError):
    """A scenario scripted an action the domain policy forbids, or bad reasoning (a generator bug)."""


MAX_REASONING_WORDS = 80  # the cold-start reasoning limit of the issue (strictly fewer words)


@dataclass
class Dialogue:
    """Records one conversation as APIGen-MT entries while executing its tool calls.

    entries: `{"from": human|gpt|function_call|observation, "value": str}`; assistant actions also
    carry `"reasoning"` (dropped later outside the cold-start split).
    start_db: the database before the first turn (`db` is replaced, never mutated, by writes).
    request_starts: the index in `entries` where each user request (one intent of `converse`) begins.
    proposals: every write the assistant proposed, with the user's answer.
    """

    domain: Domain
    db: Db
    rng: random.Random
    entries: list[dict[str, Any]] = field(default_factory=list)
    authenticated: str | None = None  # the authenticated customer key, once verified
    _confirmed: bool = False  # the last entry is a user confirmation
    start_db: Db = field(init=False)
    request_starts: list[int] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start_db = self.db

    def begin_request(self) -> None:
        """Mark that the next user turn opens a new request (a note for the environment, no turn)."""
        self.request_starts.append(len(self.entries))

    # -- turns

    def user(self, text: str, *, confirms: bool = False) -> None:
        """A user turn; `confirms=True` marks an explicit yes to the change just proposed."""
        self.entries.append({"from": "human", "value": text})
        self._confirmed = confirms

    def say(self, text: str, reasoning: str) -> None:
        """An assistant answer."""
        self._check_reasoning(reasoning, None)
        self.entries.append({"from": "gpt", "value": text, "reasoning": reasoning})
        self._confirmed = False

    def call(self, name: str, arguments: dict[str, Any], reasoning: str) -> ToolResult:
        """Call a tool: check the policy, execute it on the database, record call and observation."""
        tool = self.domain.tool(name)
        self._check_reasoning(reasoning, name)
        problems = validate(tool.parameters, arguments)
        if problems:
            raise PolicyViolation(f"{self.domain.name}.{name}: invalid arguments: {problems}")
        if not tool.public and tool.auth_key is None and self.authenticated is None:
            raise PolicyViolation(f"{self.domain.name}.{name} called before authentication")
        if tool.writes and not self._confirmed:
            raise PolicyViolation(f"{self.domain.name}.{name} is a write without a user confirmation just before it")
        result, self.db = tool.run(self.db, arguments)
        if tool.auth_key is not None and "error" not in result:
            self.authenticated = str(result[tool.auth_key])
        self.entries.append({"from": "function_call", "value": json.dumps({"name": name, "arguments": arguments}),
                             "reasoning": reasoning})
        # Compact separators: observations are the bulk of a context, and a tiny model's context is short.
        self.entries.append({"from": "observation", "value": json.dumps(result, separators=(",", ":"))})
        self._confirmed = False
        return result

    def _check_reasoning(self, reasoning: str, tool_name: str | None) -> None:
        if len(reasoning.split()) >= MAX_REASONING_WORDS:
            raise PolicyViolation(f"reasoning has {len(reasoning.split())} words (limit {MAX_REASONING_WORDS}): {reasoning!r}")
        if tool_name is not None and tool_name not in reasoning:
            raise PolicyViolation(f"reasoning for a {tool_name} call does not name the tool: {reasoning!r}")

    # -- helpers for scenarios

    def pick(self, templates: list[str] | tuple[str, ...], /, **slots: Any) -> str:
        """One phrasing, chosen at random, with its `{slot}`s filled."""
        return self.rng.choice(templates).format(**slots)

    @property
    def action_count(self) -> int:
        return sum(entry["from"] in ("gpt", "function_call") for entry in self.entries)


def money(amount: float) -> str:
    """Dollar amounts as the answers and reasoning write them: `$24.50`."""
    return f"${amount:.2f}"


def listing(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------- shared phrasings

YES = ("Yes, please.", "Yes, go ahead.", "Yes.", "Sure, do it.", "Yes, that's right.", "Please go ahead.")
NO = ("No, leave it as it is.", "Actually no, don't.", "No, thanks.", "Hmm, no. Never mind.")
THANKS = ("That's all, thanks!", "Great, thank you.", "Thanks, bye.", "Perfect, that's everything.")
GOODBYE = ("You're welcome! Have a great day.", "Glad I could help. Goodbye!", "You're welcome, take care!")


def sentences(dlg: Dialogue, parts: list[str]) -> str:
    """Join a user's sentences in random order, so details arrive in different orders."""
    shuffled = list(parts)
    dlg.rng.shuffle(shuffled)
    return " ".join(shuffled)


def confirm_write(dlg: Dialogue, proposal: str, proposal_reasoning: str, write: tuple[str, dict[str, Any]],
                  write_reasoning: str, report: Callable[[ToolResult], tuple[str, str]], declined: str,
                  *, yes_share: float = 0.9) -> None:
    """The policy's write pattern: propose the change (an answer ending in a question), then the user
    says yes (`yes_share` of the time: call the write tool, then answer with `report(result)`, a
    (text, reasoning) pair) or no (answer `declined`, no call)."""
    dlg.say(proposal, proposal_reasoning)
    accepted = dlg.rng.random() < yes_share
    dlg.proposals.append(Proposal(len(dlg.entries) - 1, write[0], write[1], accepted))
    if accepted:
        dlg.user(dlg.pick(YES), confirms=True)
        result = dlg.call(write[0], write[1], write_reasoning)
        text, reasoning = report(result)
        dlg.say(text, reasoning)
    else:
        dlg.user(dlg.pick(NO))
        dlg.say(declined, f"The user declined, so I must not call {write[0]}. I acknowledge and change nothing.")


Intent = Callable[[Dialogue, bool], None]  # (dialogue, is_first_request) -> writes turns


def converse(dlg: Dialogue, openers: list[tuple[Intent, float]], followups: list[tuple[Intent, float]],
             *, more: float = 0.25, soft_limit: int = 6) -> None:
    """One conversation: an opening request, then follow-up requests, then maybe a goodbye.

    Follow-ups are added while the conversation has fewer than 3 assistant actions, and after that
    with probability `more` while it has at most `soft_limit`; the caller rejects anything over 10.
    """
    rng = dlg.rng
    intents, weights = zip(*openers)
    intent = rng.choices(intents, weights)[0]
    dlg.begin_request()
    intent(dlg, True)
    intents, weights = zip(*followups)
    while dlg.action_count < 3 or (dlg.action_count <= soft_limit and rng.random() < more):
        intent = rng.choices(intents, weights)[0]
        dlg.begin_request()
        intent(dlg, False)
    if rng.random() < 0.1 and dlg.action_count < 10:
        dlg.begin_request()
        dlg.user(dlg.pick(THANKS))
        dlg.say(dlg.pick(GOODBYE), "The user has nothing else to ask, so I close the conversation politely.")
