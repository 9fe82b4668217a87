"""Tests of the built-in synthetic world (data/synthetic): determinism, splits, schemas, policy,
executable observations, cold-start reasoning, and the command line."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from data.synthetic import (
    DOMAINS, IN_DOMAIN, SPLIT_FILES, generate_conversation, generate_splits, write_splits,
)
from data.synthetic.__main__ import main as cli_main
from data.synthetic.airline import AIRLINE
from data.synthetic.retail import RETAIL
from data.synthetic.telecom import TELECOM
from data.synthetic.world import YES, Dialogue, PolicyViolation, validate

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=120, n_test=40, n_ood=40, n_coldstart=60)
ACTIONS = ("gpt", "function_call")


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, Any]]]:
    return generate_splits(seed=0)  # the default sizes: 1000 / 200 / 200 / 100 reasoning actions


def rows_of(splits: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [row for rows in splits.values() for row in rows]


def calls_of(row: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    """(entry index, tool name, arguments) of every function_call in a row."""
    found = []
    for index, entry in enumerate(row["conversations"]):
        if entry["from"] == "function_call":
            call = json.loads(entry["value"])
            found.append((index, call["name"], call["arguments"]))
    return found


# ----------------------------------------------------------------------------- determinism and splits


def test_same_seed_gives_identical_json_and_another_seed_differs() -> None:
    first = json.dumps(generate_splits(seed=5, **SMALL))
    again = json.dumps(generate_splits(seed=5, **SMALL))
    other = json.dumps(generate_splits(seed=6, **SMALL))
    assert first == again
    assert first != other


def test_a_split_does_not_change_when_another_split_grows() -> None:
    small = generate_splits(seed=2, n_train=10, n_test=20, n_ood=5, n_coldstart=30)
    large = generate_splits(seed=2, n_train=60, n_test=20, n_ood=5, n_coldstart=30)
    assert small["test"] == large["test"]
    assert small["ood_test"] == large["ood_test"]
    assert small["coldstart"] == large["coldstart"]
    assert small["train"] == large["train"][:10]


def test_split_sizes_keys_and_row_format(splits: dict[str, list[dict[str, Any]]]) -> None:
    assert list(splits) == ["train", "test", "ood_test", "coldstart"]
    assert (len(splits["train"]), len(splits["test"]), len(splits["ood_test"])) == (1000, 200, 200)
    for row in rows_of(splits):
        assert set(row) == {"id", "domain", "system", "tools", "conversations"}
        assert row["id"].startswith(row["domain"] + "-")
        assert row["system"] == DOMAINS[row["domain"]].policy
        assert isinstance(row["tools"], str) and isinstance(json.loads(row["tools"]), list)
        for entry in row["conversations"]:
            assert entry["from"] in ("human", "gpt", "function_call", "observation")
            assert isinstance(entry["value"], str) and entry["value"]


def test_splits_are_disjoint_by_id_and_by_content(splits: dict[str, list[dict[str, Any]]]) -> None:
    ids = [row["id"] for row in rows_of(splits)]
    assert len(ids) == len(set(ids))
    owner: dict[str, str] = {}
    for name, rows in splits.items():
        for row in rows:
            content = json.dumps([[entry["from"], entry["value"]] for entry in row["conversations"]])
            assert owner.setdefault(content, name) == name, f"{row['id']} repeats a conversation of {owner[content]}"


def test_ood_split_is_telecom_only_and_the_others_in_domain(splits: dict[str, list[dict[str, Any]]]) -> None:
    assert {row["domain"] for row in splits["ood_test"]} == {"telecom"}
    for name in ("train", "test", "coldstart"):
        assert {row["domain"] for row in splits[name]} == {"retail", "airline"}
    in_domain_tools = {tool.name for domain in IN_DOMAIN for tool in domain.tools}
    assert not in_domain_tools & {tool.name for tool in TELECOM.tools}


def test_every_conversation_has_3_to_10_assistant_actions(splits: dict[str, list[dict[str, Any]]]) -> None:
    for row in rows_of(splits):
        actions = sum(entry["from"] in ACTIONS for entry in row["conversations"])
        assert 3 <= actions <= 10, row["id"]
        assert row["conversations"][0]["from"] == "human"
        assert row["conversations"][-1]["from"] == "gpt"  # every conversation ends on an answer


def test_invalid_sizes_are_rejected_with_the_flag_name() -> None:
    with pytest.raises(ValueError, match="n_coldstart"):
        generate_splits(n_coldstart=101)
    with pytest.raises(ValueError, match="n_test"):
        generate_splits(n_test=-1)


# ----------------------------------------------------------------------------- tools and schemas


def test_validate_catches_each_kind_of_schema_error() -> None:
    schema = {"type": "object", "required": ["id", "n"],
              "properties": {"id": {"type": "string"}, "n": {"type": "integer"},
                             "mode": {"type": "string", "enum": ["a", "b"]}, "price": {"type": "number"},
                             "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}
    assert validate(schema, {"id": "x", "n": 2, "mode": "a", "price": 3, "ids": ["p"]}) == []
    assert validate(schema, {"id": "x"}) == ["arguments: missing required key 'n'"]
    assert validate(schema, {"id": "x", "n": "2"}) == ["arguments.n: expected integer, got str"]
    assert validate(schema, {"id": "x", "n": True}) == ["arguments.n: expected integer, got boolean"]
    assert validate(schema, {"id": "x", "n": 1, "mode": "c"}) == ["arguments.mode: 'c' is not one of ['a', 'b']"]
    assert validate(schema, {"id": "x", "n": 1, "extra": 0}) == ["arguments: undeclared key 'extra'"]
    assert validate(schema, {"id": "x", "n": 1, "ids": []}) == ["arguments.ids: fewer than 1 items"]
    assert validate(schema, {"id": "x", "n": 1, "ids": [3]}) == ["arguments.ids[0]: expected string, got int"]
    assert validate(schema, {"id": "x", "n": 1.5}) == ["arguments.n: expected integer, got float"]


def test_domains_have_enough_short_tools_and_short_policies() -> None:
    for domain in DOMAINS.values():
        assert len(domain.tools) >= 8, domain.name
        assert len(domain.policy.split()) <= 90, domain.name
        assert len(domain.tools_json()) < 2500, domain.name
        assert any(len(tool.parameters["required"]) < len(tool.parameters["properties"]) for tool in domain.tools), \
            f"{domain.name} has no optional parameter"
        assert any("enum" in schema for tool in domain.tools for schema in tool.parameters["properties"].values())
        for tool in domain.tools:
            assert tool.description.endswith(".") and tool.description.count(".") == 1, tool.name
            assert len(tool.description) <= 60, tool.name
            assert json.loads(json.dumps(tool.schema())) == tool.schema()


def test_tool_calls_use_declared_tools_and_valid_arguments(splits: dict[str, list[dict[str, Any]]]) -> None:
    for row in rows_of(splits):
        declared = {tool["name"]: tool["parameters"] for tool in json.loads(row["tools"])}
        for _, name, arguments in calls_of(row):
            assert name in declared, f"{row['id']} calls undeclared {name}"
            schema = declared[name]
            assert validate(schema, arguments) == [], f"{row['id']} {name} {arguments}"
            assert set(schema["required"]) <= set(arguments)


def test_observations_are_the_results_of_executing_the_calls_in_order() -> None:
    """Replay: rebuild each conversation's starting database from the same random stream, execute
    its calls one after the other (write calls change the database), compare with the observations."""
    for index in range(150):
        domain = (RETAIL, AIRLINE, TELECOM)[index % 3]
        entries = generate_conversation(domain, random.Random(f"replay/{index}"))
        db = domain.make_db(random.Random(f"replay/{index}"))  # make_db is the stream's first consumer
        for position, entry in enumerate(entries):
            if entry["from"] != "function_call":
                continue
            call = json.loads(entry["value"])
            result, db = domain.tool(call["name"]).run(db, call["arguments"])
            observation = entries[position + 1]
            assert observation["from"] == "observation"
            assert json.loads(observation["value"]) == result


def test_write_tools_change_a_copy_of_the_database_and_compute_amounts() -> None:
    db = RETAIL.make_db(random.Random(11))
    before = json.dumps(db, sort_keys=True)
    user = next(iter(db["users"].values()))
    pending = next((order for order in db["orders"].values() if order["status"] == "pending"), None)
    assert pending is not None  # this seed's customer has a pending order
    result, after = RETAIL.tool("cancel_order").run(db, {"order_id": pending["order_id"], "reason": "ordered by mistake"})
    assert result == {"order_id": pending["order_id"], "status": "cancelled", "refund": pending["total"]}
    assert after["orders"][pending["order_id"]]["status"] == "cancelled"
    assert json.dumps(db, sort_keys=True) == before  # the input database is untouched
    again, _ = RETAIL.tool("cancel_order").run(after, {"order_id": pending["order_id"], "reason": "ordered by mistake"})
    assert "error" in again
    assert user["user_id"] in after["users"]

    # A hand-built order: returning two of its items refunds 24.00 + 18.50 = 42.50.
    order = {"order_id": "O1", "user_id": "U1", "status": "delivered", "days_since_delivery": 3, "total": 55.0,
             "address": "1 Oak St, Easton",
             "items": [{"item_id": "P101", "name": "desk lamp", "price": 24.0},
                       {"item_id": "P102", "name": "wool scarf", "price": 18.5},
                       {"item_id": "P116", "name": "usb cable", "price": 12.5}]}
    small = {"users": {}, "orders": {"O1": order}, "products": {}}
    result, _ = RETAIL.tool("return_items").run(small, {"order_id": "O1", "item_ids": ["P101", "P102"],
                                                        "refund_method": "gift_card"})
    assert result == {"order_id": "O1", "status": "return requested", "refund": 42.5, "refund_method": "gift_card"}
    late = {**small, "orders": {"O1": {**order, "days_since_delivery": 31}}}
    assert "error" in RETAIL.tool("return_items").run(late, {"order_id": "O1", "item_ids": ["P101"]})[0]


def test_airline_bag_fees_and_booking_seats() -> None:
    customer = {"customer_id": "C1", "first_name": "Ana", "last_name": "Ruiz", "tier": "silver", "reservations": ["R1"]}
    reservation = {"reservation_id": "R1", "customer_id": "C1", "flight_id": "FL100", "origin": "BOS",
                   "destination": "SEA", "date": "2025-06-01", "cabin": "economy", "passengers": 2, "bags": 1,
                   "insurance": False, "status": "booked", "seat_price": 200, "paid": 400}
    flight = {"flight_id": "FL100", "origin": "BOS", "destination": "SEA", "depart": "08:00",
              "prices": {"basic": 160, "economy": 200, "business": 600}, "seats": 3, "status": "on time",
              "delay_min": 0}
    db = {"customers": {"C1": customer}, "reservations": {"R1": reservation}, "flights": {"FL100": flight}}
    result, after = AIRLINE.tool("add_bags").run(db, {"reservation_id": "R1", "bags": 2})
    assert result == {"reservation_id": "R1", "bags": 3, "fee": 70}  # 2 x $35
    assert after["reservations"]["R1"]["paid"] == 470
    gold = {**db, "customers": {"C1": {**customer, "tier": "gold"}}}
    assert AIRLINE.tool("add_bags").run(gold, {"reservation_id": "R1", "bags": 2})[0]["fee"] == 0
    assert "error" in AIRLINE.tool("add_bags").run(db, {"reservation_id": "R1", "bags": 4})[0]  # 1 + 4 > 4
    assert "error" in AIRLINE.tool("cancel_reservation").run(db, {"reservation_id": "R1", "reason": "other"})[0]
    booking, booked = AIRLINE.tool("book_flight").run(
        db, {"customer_id": "C1", "flight_id": "FL100", "date": "2025-07-01", "cabin": "business", "passengers": 2,
             "insurance": True})
    assert booking["total"] == 2 * 600 + 2 * 25
    assert booked["flights"]["FL100"]["seats"] == 1
    assert booking["reservation_id"] in booked["customers"]["C1"]["reservations"]
    assert "error" in AIRLINE.tool("book_flight").run(
        booked, {"customer_id": "C1", "flight_id": "FL100", "date": "2025-07-01", "cabin": "economy",
                 "passengers": 2})[0]


def test_the_dialogue_recorder_refuses_policy_violations() -> None:
    dialogue = Dialogue(RETAIL, RETAIL.make_db(random.Random(3)), random.Random(3))
    order_id = next(iter(dialogue.db["orders"]))
    dialogue.user("Cancel my order.")
    with pytest.raises(PolicyViolation, match="before authentication"):
        dialogue.call("get_order", {"order_id": order_id}, "I call get_order.")
    user = next(iter(dialogue.db["users"].values()))
    dialogue.call("find_user_by_email", {"email": user["email"]}, "I call find_user_by_email.")
    with pytest.raises(PolicyViolation, match="confirmation"):
        dialogue.call("cancel_order", {"order_id": order_id, "reason": "ordered by mistake"}, "I call cancel_order.")
    with pytest.raises(PolicyViolation, match="invalid arguments"):
        dialogue.call("get_order", {"order": order_id}, "I call get_order.")
    with pytest.raises(PolicyViolation, match="does not name the tool"):
        dialogue.call("get_order", {"order_id": order_id}, "I look the order up.")


# ----------------------------------------------------------------------------- policy and learnability


def test_policy_order_authenticate_then_confirm_then_write(splits: dict[str, list[dict[str, Any]]]) -> None:
    """No account tool before a successful authentication; every write call comes right after a user
    'yes' that answers an assistant question."""
    for row in rows_of(splits):
        domain = DOMAINS[row["domain"]]
        entries = row["conversations"]
        authenticated = False
        for index, name, _ in calls_of(row):
            tool = domain.tool(name)
            if tool.auth_key is not None:
                authenticated = authenticated or "error" not in json.loads(entries[index + 1]["value"])
                continue
            if not tool.public:
                assert authenticated, f"{row['id']}: {name} before authentication"
            if tool.writes:
                yes, proposal = entries[index - 1], entries[index - 2]
                assert yes["from"] == "human" and yes["value"] in YES, f"{row['id']}: {name} without a yes"
                assert proposal["from"] == "gpt" and proposal["value"].endswith("?"), row["id"]


def test_arguments_are_derivable_from_the_context(splits: dict[str, list[dict[str, Any]]]) -> None:
    """Every free-form argument value (not an enum, not a boolean) appears in the text before the call."""
    for row in splits["test"] + splits["ood_test"]:
        declared = {tool["name"]: tool["parameters"]["properties"] for tool in json.loads(row["tools"])}
        entries = row["conversations"]
        for index, name, arguments in calls_of(row):
            context = " ".join(entry["value"] for entry in entries[:index])
            for key, value in arguments.items():
                if "enum" in declared[name][key] or isinstance(value, bool):
                    continue
                values = value if isinstance(value, list) else [value]
                for item in values:
                    text = f"{item:g}" if isinstance(item, float) else str(item)
                    assert text in context, f"{row['id']}: {name}.{key}={item!r} not in the context"


def test_tool_call_share_is_between_half_and_two_thirds(splits: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("train", "test", "ood_test"):
        for domain in {row["domain"] for row in splits[name]}:
            entries = [entry for row in splits[name] if row["domain"] == domain for entry in row["conversations"]]
            actions = sum(entry["from"] in ACTIONS for entry in entries)
            share = sum(entry["from"] == "function_call" for entry in entries) / actions
            assert 0.5 <= share <= 0.67, (name, domain, share)


def test_answers_and_calls_both_follow_observations_and_user_turns(splits: dict[str, list[dict[str, Any]]]) -> None:
    """'Call or answer' is not decided by the previous turn's role alone."""
    seen = set()
    for row in splits["train"]:
        entries = row["conversations"]
        for previous, entry in zip(entries, entries[1:]):
            if entry["from"] in ACTIONS:
                seen.add((previous["from"], entry["from"]))
    assert seen >= {("human", "gpt"), ("human", "function_call"), ("observation", "gpt"),
                    ("observation", "function_call")}


def test_conversations_stay_short(splits: dict[str, list[dict[str, Any]]]) -> None:
    lengths = sorted(sum(len(entry["value"]) for entry in row["conversations"]) for row in splits["train"])
    assert lengths[len(lengths) // 2] < 1100
    assert lengths[-1] < 2500


# ----------------------------------------------------------------------------- cold-start reasoning


def test_coldstart_reasoning_budget_length_and_tool_names(splits: dict[str, list[dict[str, Any]]]) -> None:
    annotated = [entry for row in splits["coldstart"] for entry in row["conversations"] if "reasoning" in entry]
    assert len(annotated) == 100
    for entry in annotated:
        assert entry["from"] in ACTIONS
        assert 5 <= len(entry["reasoning"].split()) < 80
        if entry["from"] == "function_call":
            assert json.loads(entry["value"])["name"] in entry["reasoning"]
    for name in ("train", "test", "ood_test"):
        assert not any("reasoning" in entry for row in splits[name] for entry in row["conversations"])
    small = generate_splits(seed=0, n_train=1, n_test=1, n_ood=1, n_coldstart=7)["coldstart"]
    assert sum("reasoning" in entry for row in small for entry in row["conversations"]) == 7
    assert generate_splits(seed=0, n_train=1, n_test=1, n_ood=1, n_coldstart=0)["coldstart"] == []


_MONEY = r"\$(\d+\.\d\d)"


def test_reasoning_arithmetic_is_correct() -> None:
    """Every 'a x $p = $t', '$a + $b = $c', '($a - $b) x n = $d' and '$a - $b = $c' in the reasoning
    (of all actions of many conversations, not only the cold-start ones) is right."""
    checked = 0
    for index in range(600):
        domain = (RETAIL, AIRLINE, TELECOM)[index % 3]
        for entry in generate_conversation(domain, random.Random(f"arith/{index}")):
            reasoning = entry.get("reasoning", "")
            for count, price, total in re.findall(rf"(\d+) x {_MONEY} = {_MONEY}", reasoning):
                assert int(count) * float(price) == pytest.approx(float(total)), reasoning
                checked += 1
            for terms, total in re.findall(rf"((?:\$\d+\.\d\d \+ )+\$\d+\.\d\d) = {_MONEY}", reasoning):
                assert sum(float(term[1:]) for term in terms.split(" + ")) == pytest.approx(float(total)), reasoning
                checked += 1
            for new, old, count, sign, total in re.findall(rf"\({_MONEY} - {_MONEY}\) x (\d+) = (-?){_MONEY}",
                                                           reasoning):
                expected = (float(new) - float(old)) * int(count)
                assert expected == pytest.approx(float(total) * (-1 if sign else 1)), reasoning
                checked += 1
            for first, second, total in re.findall(rf"{_MONEY} - {_MONEY} = {_MONEY}", reasoning):
                assert float(first) - float(second) == pytest.approx(float(total)), reasoning
                checked += 1
    assert checked > 100


def test_reasoning_states_the_facts_of_the_observation() -> None:
    """A reasoning that reports a read result names values that are in that result."""
    for index in range(300):
        entries = generate_conversation(RETAIL, random.Random(f"facts/{index}"))
        for previous, entry in zip(entries, entries[1:]):
            if previous["from"] == "observation" and entry["from"] == "gpt" and "get_order shows order" in entry["reasoning"]:
                status = json.loads(previous["value"])["status"]
                assert status in entry["reasoning"] and status in entry["value"]


# ----------------------------------------------------------------------------- files and command line


def test_write_splits_writes_four_json_arrays(tmp_path: Path) -> None:
    paths = write_splits(tmp_path / "out", seed=3, **SMALL)
    assert {name: path.name for name, path in paths.items()} == SPLIT_FILES
    written = {name: json.loads(path.read_text(encoding="utf-8")) for name, path in paths.items()}
    assert written == generate_splits(seed=3, **SMALL)


def test_cli_writes_the_four_files_and_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_main(["--out", str(tmp_path / "tmp"), "--seed", "1"])
    printed = capsys.readouterr().out
    for name, file_name in SPLIT_FILES.items():
        rows = json.loads((tmp_path / "tmp" / file_name).read_text(encoding="utf-8"))
        assert rows and name in printed
    assert len(json.loads((tmp_path / "tmp" / "train.json").read_text())) == 1000
    with pytest.raises(SystemExit):
        cli_main(["--out", str(tmp_path / "bad"), "--n-coldstart", "500"])


def test_cli_output_is_byte_identical_across_processes(tmp_path: Path) -> None:
    """Same seed, different hash seeds (set/dict order) and processes: the same bytes."""
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "data.synthetic", "--out", str(out), "--seed", "1", "--n-train", "50",
                        "--n-test", "10", "--n-ood", "10", "--n-coldstart", "20"],
                       cwd=REPO, env=env, check=True, capture_output=True)
        outputs.append({name: (out / name).read_bytes() for name in SPLIT_FILES.values()})
    assert outputs[0] == outputs[1]
