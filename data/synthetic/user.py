"""The scripted user of the synthetic environment: deterministic, keyword-driven, in the generator's words.

tau-bench simulates the customer with an LLM that reads a goal.  Here the customer is a small
deterministic program whose goal is read off the scripted conversation (`user_goal`), so replaying
the scripted assistant reproduces the scripted conversation word for word, and any other assistant
meets the same customer.  A goal is

    identity   the values the user authenticates with (email, or name + zip; customer id + last name;
               phone + PIN), taken from the script's successful authentication call
    requests   what the user wants, in order.  Each request is its opening message, the user's
               scripted answers to the assistant's questions (which facts each answer gives), and at
               most one change: a write the user accepts (then the write must happen) or turns down.

`user_goal` labels each scripted answer with the facts that the user's own recogniser (below) finds
in the scripted question before it, and raises on a question it cannot read: the generator's
phrasings and what the user understands cannot drift apart unnoticed.

How the user reads an assistant answer (`SimulatedUser.respond`), in this order:

1. **A question for facts.**  The answer is split into sentences; a sentence asks when it ends with
   "?" or holds a request ("please give", "I need your", ...).  A fact is asked when an asking
   sentence names it with one of its cue words (`FACT_CUES`: "email", "zip", "order id", "which
   items", "cabin", "which flight", "card or bank", ...), or when the answer repeats a wrong value
   the user gave (a mistyped email) and asks anything.  The user replies with its next scripted
   answer to exactly those facts (or one that gives more); asked again, with its identity sentence
   and this request's answers that held the other facts; asked for a fact it never gave in this
   request (say an order id that was in its opening message), it repeats its opening message.
2. **A proposal.**  While the current request has a change, any other question is read as a
   proposal.  The user says yes (its scripted yes) when the change is one it wants and the
   answer names what the change is about (`_MENTIONS`: the order or reservation id, the items,
   the new address, flight, date, cabin, passenger count, bag count, amount and method, plan,
   GB, phone) and no other of the user's orders or reservations or items; otherwise it says no.
   A "yes" is the only thing that lets the environment run a write.
3. **Anything else** answers the current request: the user opens its next request, or, after its
   last one, is done (its goal met, or turned down).

What it cannot understand: paraphrases outside the cue words (a question for the email that never
says "email", "zip" or "name"), a proposal that names the change in other words (for example the
refund method as "store credit"), questions in a request that has no change (they count as the
answer), and small talk: a statement that is not the answer still ends the request.  It never
volunteers a fact it was not asked for, and never changes its mind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from data.synthetic.world import NO, Db, Dialogue, money

# fact -> cue words (matched as whole words, case-insensitive, in an asking sentence), per domain
FACT_CUES: dict[str, dict[str, tuple[str, ...]]] = {
    "retail": {"identity": ("email", "zip", "name"), "order_id": ("order id", "which order"),
               "items": ("which items", "which item", "what items")},
    "airline": {"identity": ("customer id", "last name"),
                "reservation_id": ("reservation id", "which reservation", "booking id"),
                "cabin": ("cabin",), "flight": ("which flight", "which one")},
    "telecom": {"identity": ("phone number", "pin"), "method": ("card or bank", "payment method")},
}
ASKING = ("please give", "please provide", "please share", "please tell", "i need your", "i need the",
          "tell me", "could you share")
# The authentication sentence each domain's user says first (the generator's first phrasing).
IDENTITY_PHRASES: dict[str, str] = {
    "find_user_by_email": "My email is {email}.",
    "find_user_by_name_zip": "I'm {first_name} {last_name}, zip {zip}.",
    "verify_customer": "My customer id is {customer_id}, last name {last_name}.",
    "verify_account": "My number is {phone} and my PIN is {pin}.",
}


def said(text: str, value: str) -> bool:
    """`value` occurs in `text` as a whole token (case-insensitive): "O12" is not in "O123", "$20.00"
    is not in "$120.00", "70" is not in "$70.00", "2 bag" is not in "12 bags"."""
    pattern = r"(?<![\w$])(?<!\d\.)" + re.escape(value) + r"(?!\w|\.\d)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def asking_sentences(text: str) -> list[str]:
    sentences = re.split(r"(?<=[.?!])\s+", text.strip())
    return [s for s in sentences if s.endswith("?") or any(marker in s.lower() for marker in ASKING)]


def asked_facts(domain: str, text: str, wrong_values: tuple[str, ...] = ()) -> frozenset[str]:
    """The facts an assistant answer asks the user for (empty: it asks for none)."""
    asking = asking_sentences(text)
    facts = {fact for fact, cues in FACT_CUES[domain].items()
             if any(said(sentence, cue) for sentence in asking for cue in cues)}
    if asking and any(said(text, value) for value in wrong_values):
        facts.add("identity")
    return frozenset(facts)


# ----------------------------------------------------------------------------- the goal


@dataclass(frozen=True)
class Change:
    """A write the user wants (`accept`) or will turn down when the assistant proposes it."""

    tool: str
    arguments: dict[str, Any]
    accept: bool


@dataclass(frozen=True)
class Request:
    """One thing the user asks for: its opening message, its scripted answers to the assistant's
    questions as (facts given, text) in order, and its change and scripted yes / no (or None)."""

    opening: str
    answers: tuple[tuple[frozenset[str], str], ...]
    change: Change | None = None
    decision: str | None = None


@dataclass(frozen=True)
class UserGoal:
    domain: str
    identity_tool: str           # the authentication tool the identity is for
    identity: dict[str, str]     # its arguments: the account facts the user knows
    wrong_values: tuple[str, ...]  # values the user first gave wrongly (a mistyped email)
    requests: tuple[Request, ...]

    @property
    def identity_text(self) -> str:
        phrase = IDENTITY_PHRASES.get(self.identity_tool)
        if phrase is None:
            return " ".join(f"My {key.replace('_', ' ')} is {value}." for key, value in self.identity.items())
        return phrase.format(**self.identity)

    def describe(self) -> str:
        """The goal as an instruction, in tau-bench's manner (for reading and debugging)."""
        lines = [f"You are a {self.domain} customer. {self.identity_text}"]
        for number, request in enumerate(self.requests, 1):
            lines.append(f"{number}. Say: {request.opening!r}")
            lines += [f"   Asked for {', '.join(sorted(facts))}: {text!r}" for facts, text in request.answers]
            if request.change is not None:
                verdict = "accept" if request.change.accept else "turn down"
                lines.append(f"   {verdict} {request.change.tool} {request.change.arguments}")
        return "\n".join(lines)


def _identity(dialogue: Dialogue) -> tuple[str, dict[str, str], tuple[str, ...]]:
    """(auth tool, its arguments, wrong values) from the script's authentication calls; a user who
    never authenticated knows the first auth tool's arguments from its database record."""
    auth_tools = [tool for tool in dialogue.domain.tools if tool.auth_key is not None]
    wrong: list[str] = []
    entries = dialogue.entries
    for index, entry in enumerate(entries):
        if entry["from"] != "function_call":
            continue
        call = json.loads(entry["value"])
        if call["name"] not in {tool.name for tool in auth_tools}:
            continue
        if "error" in json.loads(entries[index + 1]["value"]):
            wrong += [value for value in call["arguments"].values() if isinstance(value, str)]
            continue
        wrong = [value for value in wrong if value not in call["arguments"].values()]
        return call["name"], dict(call["arguments"]), tuple(wrong)
    tool = auth_tools[0]
    wanted = tool.parameters["required"]
    for table in dialogue.start_db.values():
        record = next(iter(table.values()), {})
        if all(key in record for key in wanted):
            return tool.name, {key: record[key] for key in wanted}, tuple(wrong)
    raise ValueError(f"no record in the {dialogue.domain.name} database holds {wanted}")


def user_goal(dialogue: Dialogue) -> UserGoal:
    """The user's goal, read off a scripted dialogue: each request's opening, the scripted answers to
    the assistant's questions (labelled with the facts `asked_facts` finds in the question, so the
    user's recogniser is checked against every scripted question), and the proposed change."""
    domain = dialogue.domain.name
    identity_tool, identity, wrong = _identity(dialogue)
    proposals = {proposal.entry: proposal for proposal in dialogue.proposals}
    entries = dialogue.entries
    bounds = list(dialogue.request_starts) + [len(entries)]
    requests = []
    for start, end in zip(bounds, bounds[1:]):
        if entries[start]["from"] != "human":
            raise ValueError(f"request at entry {start} does not open with a user turn")
        answers: list[tuple[frozenset[str], str]] = []
        change, decision = None, None
        for index in range(start + 1, end):
            if entries[index]["from"] != "human":
                continue
            question = entries[index - 1]["value"]
            if index - 1 in proposals:
                proposal = proposals[index - 1]
                change = Change(proposal.tool, dict(proposal.arguments), proposal.accepted)
                decision = entries[index]["value"]
                continue
            facts = asked_facts(domain, question, wrong)
            if not facts:
                raise ValueError(f"the user cannot tell which fact this scripted question asks for: {question!r}")
            answers.append((facts, entries[index]["value"]))
        requests.append(Request(entries[start]["value"], tuple(answers), change, decision))
    return UserGoal(domain, identity_tool, identity, wrong, tuple(requests))


# ----------------------------------------------------------------------------- judging a proposal


def _others(db: Db, table: str, key: str) -> list[str]:
    return [other for other in db.get(table, {}) if other != key]


def _return_mentions(args: dict[str, Any], db: Db) -> tuple[list[tuple[str, ...]], list[str]]:
    order = db["orders"].get(args["order_id"], {"items": []})
    chosen = set(args["item_ids"])
    names = {item["item_id"]: item["name"] for item in order["items"]}
    required = [(args["order_id"],)] + [(item_id, names.get(item_id, item_id)) for item_id in args["item_ids"]]
    forbidden = _others(db, "orders", args["order_id"])
    forbidden += [value for item_id, name in names.items() if item_id not in chosen for value in (item_id, name)]
    if args.get("refund_method") == "gift_card":
        required.append(("gift card",))
    else:
        forbidden.append("gift card")
    return required, forbidden


def _bag_mentions(args: dict[str, Any], db: Db) -> tuple[list[tuple[str, ...]], list[str]]:
    count = args["bags"]
    total = db["reservations"].get(args["reservation_id"], {}).get("bags", 0) + count
    return ([(args["reservation_id"],), (f"{count} bag", f"{count} bags", f"{total} bags")],
            _others(db, "reservations", args["reservation_id"]))


def _booking_mentions(args: dict[str, Any], db: Db) -> tuple[list[tuple[str, ...]], list[str]]:
    count = args["passengers"]
    required = [(args["flight_id"],), (args["date"],), (args["cabin"],), (f"{count} passenger", f"{count} passengers")]
    if args.get("insurance"):
        return required + [("insurance",)], []
    return required, ["insurance"]


def _phone(args: dict[str, Any], db: Db) -> tuple[list[tuple[str, ...]], list[str]]:
    account = db["accounts"].get(args["account_id"])
    return ([(account["phone"],)] if account else []), []


# tool -> (arguments, database) -> (groups of alternatives the proposal must name one of each, words it must not name)
_MENTIONS: dict[str, Callable[[dict[str, Any], Db], tuple[list[tuple[str, ...]], list[str]]]] = {
    "cancel_order": lambda a, db: ([(a["order_id"],)], _others(db, "orders", a["order_id"])),
    "change_address": lambda a, db: ([(a["order_id"],), (a["address"],)], _others(db, "orders", a["order_id"])),
    "return_items": _return_mentions,
    "book_flight": _booking_mentions,
    "cancel_reservation": lambda a, db: ([(a["reservation_id"],)], _others(db, "reservations", a["reservation_id"])),
    "change_flight": lambda a, db: ([(a["reservation_id"],), (a["flight_id"],)],
                                    _others(db, "reservations", a["reservation_id"])),
    "add_bags": _bag_mentions,
    "pay_bill": lambda a, db: ([(money(a["amount"]),), (a["method"],)], ["bank" if a["method"] == "card" else "card"]),
    "change_plan": lambda a, db: ([(a["plan"],)], []),
    "buy_data": lambda a, db: ([(f"{a['gb']} GB",)], []),
    "suspend_line": _phone,
}


def proposal_matches(text: str, change: Change, db: Db) -> bool:
    """Whether an assistant's proposal names the change the user wants (see `_MENTIONS`)."""
    required, forbidden = _MENTIONS.get(change.tool, lambda a, db: ([], []))(change.arguments, db)
    return (all(any(said(text, value) for value in group) for group in required)
            and not any(said(text, value) for value in forbidden))


# ----------------------------------------------------------------------------- the simulator


@dataclass(frozen=True)
class UserReply:
    text: str | None   # the user's message; None when the user is done and says nothing more
    confirms: bool     # an explicit yes to the change just proposed (allows one write)
    done: bool         # the user's goal is met or turned down: the episode ends


@dataclass
class SimulatedUser:
    """Plays one `UserGoal`; deterministic: the same answers always get the same replies."""

    goal: UserGoal
    request: int = 0
    used: set[int] = field(default_factory=set)  # indices of the current request's answers already given

    def opening(self) -> str:
        return self.goal.requests[0].opening

    def respond(self, answer: str, db: Db) -> UserReply:
        """The user's reply to an assistant answer; `db` is the current database (to read a proposal)."""
        request = self.goal.requests[self.request]
        facts = asked_facts(self.goal.domain, answer, self.goal.wrong_values)
        if facts:
            return UserReply(self._tell(request, facts), False, False)
        if request.change is not None and "?" in answer:
            if request.change.accept and proposal_matches(answer, request.change, db):
                return UserReply(request.decision, True, False)
            no = request.decision if request.decision in NO else NO[0]
            return UserReply(no, False, False)
        self.request += 1
        self.used = set()
        if self.request == len(self.goal.requests):
            return UserReply(None, False, True)
        return UserReply(self.goal.requests[self.request].opening, False, False)

    def _tell(self, request: Request, facts: frozenset[str]) -> str:
        """The next scripted answer to exactly these facts, else one that gives more, else the
        identity sentence plus this request's answers that held the other facts, else the request
        repeated (the user knows nothing more)."""
        for fits in (lambda given: given == facts, lambda given: given >= facts):
            for index, (given, text) in enumerate(request.answers):
                if index not in self.used and fits(given):
                    self.used.add(index)
                    return text
        parts = [self.goal.identity_text] if "identity" in facts else []
        others = facts - {"identity"}
        parts += [text for given, text in request.answers if given & others and text not in parts]
        return " ".join(parts) if parts else request.opening
