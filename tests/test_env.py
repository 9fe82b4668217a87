"""Tests of the conversation environment over the synthetic world (data/synthetic/env.py, user.py):
tasks line up with the split rows, gold replays succeed word for word, wrong or unconfirmed writes
fail, invalid actions are errors that are counted, the turn limit, and determinism."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import pytest

from data.synthetic import generate_splits
from data.synthetic.env import Environment, Task, generate_tasks, run_episode
from data.synthetic.user import asked_facts, proposal_matches, said
from data.synthetic.world import NO, YES

SIZES = dict(n_train=40, n_test=40, n_ood=40, n_coldstart=100)


@pytest.fixture(scope="module")
def tasks() -> dict[str, list[Task]]:
    return generate_tasks(seed=0, **SIZES)


def first_task(tasks: dict[str, list[Task]], fits: Callable[[Task], bool]) -> Task:
    found = [task for split in ("test", "train", "ood_test") for task in tasks[split] if fits(task)]
    assert found, "no task of the fixture fits; grow SIZES"
    return found[0]


def accepted_change(task: Task, tool: str) -> dict[str, Any] | None:
    changes = [request.change for request in task.user.requests if request.change is not None]
    return next((change.arguments for change in changes if change.tool == tool and change.accept), None)


def write_index(actions: list[Any], tool: str) -> int:
    return next(index for index, action in enumerate(actions) if isinstance(action, dict) and action["name"] == tool)


# ----------------------------------------------------------------------------- tasks and rows


def test_split_rows_are_byte_identical_to_before_the_environment() -> None:
    # The hash of the rows before env.py existed: the hooks it added to world.py draw no random numbers.
    rows = json.dumps(generate_splits(0, n_train=50, n_test=50, n_ood=50))
    assert hashlib.sha256(rows.encode()).hexdigest() == "d88dc2af2fb94ad910918aa4fbbece2fb810d609bd01226a954a4e2da78bcde7"


def test_task_i_is_conversation_i_of_its_split(tasks: dict[str, list[Task]]) -> None:
    splits = generate_splits(seed=0, **SIZES)
    assert list(tasks) == list(splits)
    for split, rows in splits.items():
        assert [task.id for task in tasks[split]] == [row["id"] for row in rows]
        for task, row in zip(tasks[split], rows):
            assert list(task.gold) == [{"from": e["from"], "value": e["value"]} for e in row["conversations"]]
            assert (task.system, task.tools, task.domain) == (row["system"], row["tools"], row["domain"])
            assert task.user.requests[0].opening == row["conversations"][0]["value"]


# ----------------------------------------------------------------------------- gold replay


@pytest.mark.parametrize("split", ["test", "ood_test", "train"])
def test_replaying_the_gold_actions_succeeds_word_for_word(tasks: dict[str, list[Task]], split: str) -> None:
    assert len(tasks[split]) >= 30
    env = Environment()
    for task in tasks[split]:
        actions = task.gold_actions()
        episode = run_episode(env, task, actions)
        assert episode.transcript == list(task.gold), task.id  # the simulated user says what the script said
        assert episode.success and episode.db_match and not episode.missing_outputs, task.id
        assert episode.user_done and episode.turns == len(actions), task.id
        assert episode.invalid_actions == episode.policy_violations == 0, task.id
    assert {task.domain for task in tasks[split]} == ({"telecom"} if split == "ood_test" else {"retail", "airline"})


# ----------------------------------------------------------------------------- wrong writes


def _cancel_another_order(task: Task) -> dict[str, Any] | None:
    wanted = accepted_change(task, "cancel_order")
    others = [order for order, record in task.start_db.get("orders", {}).items()
              if wanted and record["status"] == "pending" and order != wanted["order_id"]]
    return {"name": "cancel_order", "arguments": {**wanted, "order_id": others[0]}} if others else None


def _pay_another_amount(task: Task) -> dict[str, Any] | None:
    wanted = accepted_change(task, "pay_bill")
    if wanted is None or wanted["amount"] <= 1:
        return None
    return {"name": "pay_bill", "arguments": {**wanted, "amount": wanted["amount"] - 1}}


def _ship_elsewhere(task: Task) -> dict[str, Any] | None:
    wanted = accepted_change(task, "change_address")
    return {"name": "change_address", "arguments": {**wanted, "address": "1 Nowhere Rd, Lakeview"}} if wanted else None


@pytest.mark.parametrize("wrong_write", [_cancel_another_order, _pay_another_amount, _ship_elsewhere])
def test_a_wrong_write_fails_the_task(tasks: dict[str, list[Task]], wrong_write: Callable) -> None:
    task = first_task(tasks, lambda task: wrong_write(task) is not None)
    actions = task.gold_actions()
    call = wrong_write(task)
    actions[write_index(actions, call["name"])] = call  # after the gold proposal and the user's yes
    env = Environment()
    episode = run_episode(env, task, actions)
    executed = episode.transcript[episode.transcript.index(
        {"from": "function_call", "value": json.dumps(call)}) + 1]
    assert "error" not in json.loads(executed["value"])  # the wrong write really ran
    assert not episode.db_match and not episode.success
    assert episode.policy_violations == episode.invalid_actions == 0


def test_the_user_turns_down_a_proposal_that_is_not_its_goal(tasks: dict[str, list[Task]]) -> None:
    task = first_task(tasks, lambda task: _cancel_another_order(task) is not None)
    wanted = accepted_change(task, "cancel_order")
    other = _cancel_another_order(task)["arguments"]["order_id"]
    env = Environment()
    env.reset(task)
    actions = task.gold_actions()
    for action in actions[:write_index(actions, "cancel_order") - 1]:  # up to the gold proposal
        env.step(action)
    reply = env.step(f"I can cancel order {other} for you. Shall I go ahead?")
    assert reply.text in NO
    refused = env.step({"name": "cancel_order", "arguments": {**wanted, "order_id": other}})
    assert refused.error == "unconfirmed_write"
    assert env.db["orders"][other]["status"] == "pending"
    change = next(request.change for request in task.user.requests
                  if request.change is not None and request.change.tool == "cancel_order")
    assert not proposal_matches(f"Cancel {wanted['order_id']} and {other}?", change, env.db)
    assert env.step(f"I can cancel order {wanted['order_id']}. Shall I go ahead?").text in YES  # the right one: yes


def test_a_write_without_the_users_yes_just_before_is_refused(tasks: dict[str, list[Task]]) -> None:
    task = first_task(tasks, lambda task: accepted_change(task, "cancel_order") is not None)
    actions = task.gold_actions()
    at = write_index(actions, "cancel_order")
    env = Environment()
    env.reset(task)
    for action in actions[:at - 1]:  # everything before the proposal: authenticated, no yes yet
        env.step(action)
    before = env.db
    step = env.step(actions[at])
    assert step.error == "unconfirmed_write" and "error" in json.loads(step.text)
    assert env.db == before
    env.step(actions[at - 1])  # the proposal: the user says yes...
    env.step({"name": "get_user", "arguments": {"user_id": env.authenticated}})  # ...but a read comes between
    assert env.step(actions[at]).error == "unconfirmed_write"
    assert env.db == before
    record = env.episode()
    assert record.policy_violations == 2 and record.errors["unconfirmed_write"] == 2 and not record.success


# ----------------------------------------------------------------------------- invalid actions


def test_unknown_tool_bad_arguments_and_no_authentication_are_counted_errors(tasks: dict[str, list[Task]]) -> None:
    task = first_task(tasks, lambda task: task.domain == "retail")
    env = Environment()
    env.reset(task)
    cases = [
        ({"name": "get_order", "arguments": {"order_id": "O1"}}, "not_authenticated"),
        ({"name": "refund_everything", "arguments": {}}, "unknown_tool"),
        ({"name": "get_order", "arguments": {"order_id": 5}}, "bad_arguments"),
        ({"name": "get_order", "arguments": {}}, "bad_arguments"),
        ({"name": "get_order", "arguments": {"order_id": "O1", "x": 1}}, "bad_arguments"),
        ({"name": "get_order", "arguments": "O1"}, "bad_arguments"),
        ({"name": "cancel_order", "arguments": {"order_id": "O1", "reason": "no longer needed"}}, "not_authenticated"),
        (None, "unparseable"), ({"arguments": {}}, "unparseable"), ({"name": 3, "arguments": {}}, "unparseable"),
        ("   ", "unparseable"), (42, "unparseable"),
    ]
    for action, kind in cases:
        step = env.step(action)
        assert step.error == kind, action
        assert "error" in json.loads(step.text) and not step.done
    record = env.episode()
    assert record.errors == {"unparseable": 5, "unknown_tool": 1, "bad_arguments": 4, "not_authenticated": 2,
                             "unconfirmed_write": 0}
    assert (record.invalid_actions, record.policy_violations, record.turns) == (10, 2, len(cases))
    assert env.db == task.start_db
    calls = [entry for entry in record.transcript if entry["from"] == "function_call"]
    assert len(calls) == 7  # unparseable actions leave no entry; every call got an error observation
    assert len(record.transcript) == 1 + 2 * len(calls)


# ----------------------------------------------------------------------------- episode end, outputs, determinism


def test_the_turn_limit_ends_an_episode(tasks: dict[str, list[Task]]) -> None:
    task = first_task(tasks, lambda task: len(task.gold_actions()) > 3)
    env = Environment(max_turns=3)
    env.reset(task)
    steps = [env.step(action) for action in task.gold_actions()[:3]]
    assert [step.done for step in steps] == [False, False, True]
    with pytest.raises(RuntimeError):
        env.step("one more")
    record = env.episode()
    assert record.turns == 3 and not record.user_done and not record.success


def test_answers_without_the_required_outputs_fail_even_with_the_right_database(tasks: dict[str, list[Task]]) -> None:
    task = first_task(tasks, lambda task: task.outputs and all(r.change is None for r in task.user.requests))
    actions = ["Done." if isinstance(action, str) else action for action in task.gold_actions()]
    episode = run_episode(Environment(), task, actions)
    assert episode.db_match and episode.user_done
    assert episode.missing_outputs == task.outputs and not episode.success


def test_the_same_task_and_actions_give_the_same_transcript(tasks: dict[str, list[Task]]) -> None:
    task, other = tasks["test"][3], tasks["test"][4]
    actions = task.gold_actions()[:2] + [{"name": "nope", "arguments": {}}, "What is your email?", None] \
        + task.gold_actions()[2:]
    env = Environment()
    first = run_episode(env, task, actions)
    run_episode(env, other, other.gold_actions())
    again = run_episode(env, task, actions)
    fresh = run_episode(Environment(), task, actions)
    assert first == again == fresh
    assert task.start_db == generate_tasks(seed=0, **SIZES)["test"][3].start_db  # episodes never touch the task


# ----------------------------------------------------------------------------- the simulated user


def test_the_user_recognises_questions_by_cue_words_in_asking_sentences() -> None:
    assert asked_facts("retail", "Could you give me your email?") == {"identity"}
    assert asked_facts("retail", "First, please give me your name and zip code, and the order id.") == \
        {"identity", "order_id"}
    assert asked_facts("retail", "Sorry, I can't change account emails here; the policy doesn't allow it.") == set()
    assert asked_facts("retail", "No account under a@b.com. Could you double-check it?", ("a@b.com",)) == {"identity"}
    assert asked_facts("airline", "Basic, economy or business cabin?") == {"cabin"}
    assert asked_facts("telecom", "I'll suspend the line for phone 555-1234 as lost. Confirm?") == set()
    assert asked_facts("telecom", "What is your PIN?") == {"identity"}
    assert asked_facts("telecom", "Shipping is free?") == set()  # "pin" only as a whole word
    assert said("Refund of $20.00.", "$20.00") and not said("Refund of $120.00.", "$20.00")
    assert not said("Order O1234.", "O123") and not said("$70.00", "70") and not said("12 bags", "2 bags")


def test_the_user_answers_a_question_for_a_fact_it_gave_in_its_opening(tasks: dict[str, list[Task]]) -> None:
    task = first_task(tasks, lambda task: task.domain == "retail" and all(
        value in task.user.requests[0].opening for value in task.user.identity.values()))
    env = Environment()
    env.reset(task)
    reply = env.step("Could you tell me your email, or your name and zip code?")
    identity = task.user.identity
    assert all(value in reply.text for value in identity.values())
    assert env.step("Sorry, what is the order id?").text  # a fact it never gave: it repeats its request


def test_building_a_goal_refuses_a_scripted_question_the_user_cannot_read() -> None:
    import random

    from data.synthetic.retail import RETAIL
    from data.synthetic.user import user_goal
    from data.synthetic.world import Dialogue

    dialogue = Dialogue(RETAIL, RETAIL.make_db(random.Random(0)), random.Random(0))
    dialogue.begin_request()
    dialogue.user("Can you help me?")
    dialogue.say("Sure, what's the weather like where you are?", "Small talk.")
    dialogue.user("Sunny.")
    with pytest.raises(ValueError, match="cannot tell which fact"):
        user_goal(dialogue)
