"""The built-in synthetic tool-calling world: the default data when no real dataset is available.

Three invented customer-service domains, each a small database, executable tools with JSON-schema
parameters and a short tau-bench-like policy (authenticate first, ask for missing details, confirm
before a write, refuse what the policy forbids):

    retail   (in-domain)      Nordbay shop: orders, cancellations, returns, tracking   data/synthetic/retail.py
    airline  (in-domain)      Skyline Air: reservations, flights, bags, changes        data/synthetic/airline.py
    telecom  (out-of-domain)  Volta Mobile: bills, plans, data top-ups, outages        data/synthetic/telecom.py

Every observation is the JSON text of the tool's result, computed by executing the tool on the
conversation's database (write tools change it for later calls).  Splits are made of whole
conversations, each generated from its own random stream `Random(f"{seed}/{split}/{index}/{attempt}")`,
so a split does not change when another split's size does:

    test       in-domain, default 200 conversations
    ood_test   telecom only, default 200
    coldstart  in-domain conversations whose first actions carry written reasoning: at most
               `n_coldstart` (default 100) reasoning-annotated actions in total
    train      in-domain, default 1,000

No conversation (by id or by content) appears in two splits.  Rows are APIGen-MT rows:
`{"id", "domain", "system", "tools" (a JSON string), "conversations": [{"from", "value"}, ...]}`;
cold-start entries may carry an extra `"reasoning"`.

    python -m data.synthetic --out data_out --seed 0     # writes train/test/ood_test/coldstart.json
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any, Iterator

from data.synthetic.airline import AIRLINE
from data.synthetic.retail import RETAIL
from data.synthetic.telecom import TELECOM
from data.synthetic.world import Dialogue, Domain

IN_DOMAIN: tuple[Domain, ...] = (RETAIL, AIRLINE)
OUT_OF_DOMAIN: tuple[Domain, ...] = (TELECOM,)
DOMAINS: dict[str, Domain] = {domain.name: domain for domain in IN_DOMAIN + OUT_OF_DOMAIN}
SPLIT_FILES: dict[str, str] = {"train": "train.json", "test": "test.json", "ood_test": "ood_test.json",
                               "coldstart": "coldstart.json"}
MIN_ACTIONS, MAX_ACTIONS = 3, 10
MAX_ATTEMPTS = 1000


def script_dialogue(domain: Domain, rng: random.Random) -> Dialogue:
    """One scripted conversation: its entries, start and final databases, and the user's requests."""
    dialogue = Dialogue(domain, domain.make_db(rng), rng)
    domain.script(dialogue)
    return dialogue


def generate_conversation(domain: Domain, rng: random.Random) -> list[dict[str, Any]]:
    """One scripted conversation's APIGen entries, reasoning included on every assistant action."""
    return script_dialogue(domain, rng).entries


def _action_count(entries: list[dict[str, Any]]) -> int:
    return sum(entry["from"] in ("gpt", "function_call") for entry in entries)


def _content_key(entries: list[dict[str, Any]]) -> str:
    return json.dumps([[entry["from"], entry["value"]] for entry in entries])


def _strip_reasoning(entries: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """Copies of the entries where only the first `keep` assistant actions keep their reasoning."""
    stripped = []
    for entry in entries:
        copy = {"from": entry["from"], "value": entry["value"]}
        if "reasoning" in entry and keep > 0:
            copy["reasoning"] = entry["reasoning"]
            keep -= 1
        stripped.append(copy)
    return stripped


def _new_conversations(seed: int, split: str, domains: tuple[Domain, ...],
                       seen: set[str]) -> Iterator[tuple[int, Domain, Dialogue]]:
    """An endless stream of (index, domain, scripted dialogue) for one split.

    Conversation `index` comes from the first attempt whose random stream
    `Random(f"{seed}/{split}/{index}/{attempt}")` gives 3-10 assistant actions and a conversation not
    in `seen` (the contents of earlier splits and of this one), which it joins.
    """
    for index in itertools.count():
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(f"{seed}/{split}/{index}/{attempt}")
            domain = rng.choice(domains)
            dialogue = script_dialogue(domain, rng)
            key = _content_key(dialogue.entries)
            if MIN_ACTIONS <= _action_count(dialogue.entries) <= MAX_ACTIONS and key not in seen:
                break
        else:
            raise RuntimeError(f"split {split!r} conversation {index}: no new valid conversation in "
                               f"{MAX_ATTEMPTS} attempts")
        seen.add(key)
        yield index, domain, dialogue


def _row(split: str, index: int, domain: Domain, entries: list[dict[str, Any]], keep_reasoning: int) -> dict[str, Any]:
    return {"id": f"{domain.name}-{split}-{index:05d}", "domain": domain.name, "system": domain.policy,
            "tools": domain.tools_json(), "conversations": _strip_reasoning(entries, keep_reasoning)}


Scripted = tuple[dict[str, Any], Dialogue]  # a split row and the dialogue that produced it


def _split_rows(seed: int, split: str, domains: tuple[Domain, ...], count: int, seen: set[str]) -> list[Scripted]:
    """`count` conversations without reasoning."""
    stream = _new_conversations(seed, split, domains, seen)
    return [(_row(split, index, domain, dialogue.entries, 0), dialogue)
            for index, domain, dialogue in itertools.islice(stream, count)]


def _coldstart_rows(seed: int, domains: tuple[Domain, ...], budget: int, seen: set[str]) -> list[Scripted]:
    """Conversations whose assistant actions keep their reasoning until `budget` actions carry
    some: every action of each conversation, and the first few of the last one."""
    rows: list[Scripted] = []
    stream = _new_conversations(seed, "coldstart", domains, seen)
    while budget > 0:
        index, domain, dialogue = next(stream)
        keep = min(_action_count(dialogue.entries), budget)
        rows.append((_row("coldstart", index, domain, dialogue.entries, keep), dialogue))
        budget -= keep
    return rows


def generate_dialogues(seed: int = 0, n_train: int = 1000, n_test: int = 200, n_ood: int = 200,
                       n_coldstart: int = 100) -> dict[str, list[Scripted]]:
    """What `generate_splits` returns, each row paired with the `Dialogue` that scripted it (its
    start and final databases and the user's requests, which the environment needs)."""
    for name, value in (("n_train", n_train), ("n_test", n_test), ("n_ood", n_ood), ("n_coldstart", n_coldstart)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if n_coldstart > 100:
        raise ValueError(f"n_coldstart counts reasoning-annotated actions and must be <= 100, got {n_coldstart}")
    seen: set[str] = set()
    splits = {"test": _split_rows(seed, "test", IN_DOMAIN, n_test, seen),
              "ood_test": _split_rows(seed, "ood_test", OUT_OF_DOMAIN, n_ood, seen),
              "coldstart": _coldstart_rows(seed, IN_DOMAIN, n_coldstart, seen),
              "train": _split_rows(seed, "train", IN_DOMAIN, n_train, seen)}
    return {name: splits[name] for name in SPLIT_FILES}


def generate_splits(seed: int = 0, n_train: int = 1000, n_test: int = 200, n_ood: int = 200,
                    n_coldstart: int = 100) -> dict[str, list[dict[str, Any]]]:
    """All four splits as APIGen-MT rows; the same seed gives identical rows.

    n_coldstart counts reasoning-annotated actions (not conversations) and must be <= 100 as in
    the paper's cold-start stage.  Splits are generated in the order test, ood_test, coldstart,
    train, and a later split skips conversations identical to an earlier one.
    """
    dialogues = generate_dialogues(seed, n_train, n_test, n_ood, n_coldstart)
    return {name: [row for row, _ in pairs] for name, pairs in dialogues.items()}


def dumps_rows(rows: list[dict[str, Any]]) -> str:
    """A JSON array with one row per line (valid JSON, readable, diff-friendly)."""
    if not rows:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n]\n"


def write_splits(out_dir: str | Path, seed: int = 0, **sizes: int) -> dict[str, Path]:
    """Generate the splits and write train.json, test.json, ood_test.json, coldstart.json in `out_dir`.

    sizes: n_train, n_test, n_ood, n_coldstart as in `generate_splits`.  Returns split -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate_splits(seed, **sizes)
    paths = {}
    for name, rows in splits.items():
        path = out / SPLIT_FILES[name]
        path.write_text(dumps_rows(rows), encoding="utf-8")
        paths[name] = path
    return paths


__all__ = ["DOMAINS", "IN_DOMAIN", "OUT_OF_DOMAIN", "SPLIT_FILES", "generate_splits", "generate_dialogues",
           "write_splits", "generate_conversation", "script_dialogue", "dumps_rows"]
