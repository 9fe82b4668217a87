"""Loaders (APIGen-MT, tau-bench, ALMITA CSV), their quirks, bad rows, samples and splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.loaders import DataError, detect_format, load_conversations, load_dataset
from data.source_apigen import parse_apigen_rows
from data.samples import conversation_samples, make_samples, split_conversations
from data.types import Conversation, Turn

TOOLS = [
    {"name": "get_order", "description": "Look up an order.",
     "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}},
    {"name": "think", "description": "Think.", "parameters": {"type": "object", "properties": {"thought": {"type": "string"}}}},
]


def apigen_row(conversations: list[dict], **extra) -> dict:
    return {"system": "You are a support agent.", "tools": json.dumps(TOOLS), "conversations": conversations, **extra}


def call(name: str, arguments) -> dict:
    return {"from": "function_call", "value": json.dumps({"name": name, "arguments": arguments})}


GOOD_ROW = apigen_row([
    {"from": "human", "value": "Where is order #A1?"},
    call("get_order", {"order_id": "#A1"}),
    {"from": "observation", "value": '{"status": "shipped"}'},
    {"from": "gpt", "value": "Your order has shipped."},
])


# --- APIGen ------------------------------------------------------------------------------------


def test_apigen_basic_row_becomes_neutral_conversation():
    conversations, stats = parse_apigen_rows([GOOD_ROW], source="mem.json")
    assert (stats.rows, stats.conversations, stats.skipped) == (1, 1, 0)
    conversation = conversations[0]
    assert conversation.system == "You are a support agent."
    # bare definitions in a JSON string -> OpenAI-style schemas
    assert conversation.tools[0] == {"type": "function", "function": TOOLS[0]}
    assert [turn.role for turn in conversation.turns] == ["user", "tool_call", "tool", "assistant"]
    assert conversation.turns[1] == Turn("tool_call", name="get_order", arguments={"order_id": "#A1"})
    assert conversation.turns[2].name == "get_order"  # a result knows which call it answers
    assert conversation.turns[3].content == "Your order has shipped."


def test_apigen_double_encoded_arguments_are_decoded_and_counted():
    row = apigen_row([
        {"from": "human", "value": "order A1"},
        {"from": "function_call", "value": json.dumps({"name": "get_order", "arguments": json.dumps({"order_id": "A1"})})},
        {"from": "observation", "value": "ok"},
    ])
    conversations, stats = parse_apigen_rows([row])
    assert conversations[0].turns[1].arguments == {"order_id": "A1"}
    assert stats.double_encoded_arguments == 1


def test_apigen_think_tool_empty_observation_is_kept():
    row = apigen_row([
        {"from": "human", "value": "hi"},
        call("think", {"thought": "greet"}),
        {"from": "observation", "value": ""},
        {"from": "gpt", "value": "Hello!"},
    ])
    conversations, stats = parse_apigen_rows([row])
    assert [turn.role for turn in conversations[0].turns] == ["user", "tool_call", "tool", "assistant"]
    assert conversations[0].turns[2].content == "" and conversations[0].turns[2].name == "think"
    assert stats.empty_observations == 1


def test_apigen_structured_observation_becomes_json_text():
    row = apigen_row([{"from": "human", "value": "A1?"}, call("get_order", {"order_id": "A1"}),
                      {"from": "observation", "value": {"status": "shipped"}}, {"from": "gpt", "value": "Shipped."}])
    conversations, _ = parse_apigen_rows([row])
    assert conversations[0].turns[2].content == '{"status": "shipped"}'


def test_apigen_conversation_ending_on_observation():
    row = apigen_row([{"from": "human", "value": "A1?"}, call("get_order", {"order_id": "A1"}),
                      {"from": "observation", "value": "shipped"}])
    conversations, stats = parse_apigen_rows([row])
    assert stats.ends_on_observation == 1
    samples = conversation_samples(conversations[0])
    assert [sample.target["kind"] for sample in samples] == ["tool_call"]  # the dangling result yields nothing


def test_apigen_two_gpt_turns_in_a_row_give_two_answer_samples():
    row = apigen_row([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello."},
                      {"from": "gpt", "value": "How can I help?"}])
    conversations, stats = parse_apigen_rows([row])
    assert stats.consecutive_assistant_turns == 1
    samples = conversation_samples(conversations[0])
    assert [sample.target for sample in samples] == [{"kind": "answer", "text": "Hello."},
                                                     {"kind": "answer", "text": "How can I help?"}]
    assert samples[1].context[-1] == Turn("assistant", content="Hello.")


def test_apigen_undeclared_tools_are_kept_and_counted():
    row = apigen_row([{"from": "human", "value": "x"}, call("cancel_order", {"order_id": "A1"}),
                      {"from": "observation", "value": "done"}, call("cancel_order", {"order_id": "A2"})])
    conversations, stats = parse_apigen_rows([row, GOOD_ROW])
    assert stats.undeclared_tool_calls == 2 and stats.undeclared_tools == {"cancel_order": 2}
    assert conversations[0].turns[1].name == "cancel_order"


def test_apigen_reasoning_key_is_kept():
    row = apigen_row([
        {"from": "human", "value": "A1?"},
        {**call("get_order", {"order_id": "A1"}), "reasoning": "I need the order status, so get_order."},
        {"from": "observation", "value": "shipped"},
        {"from": "gpt", "value": "Shipped.", "reasoning": "  "},
    ])
    conversations, _ = parse_apigen_rows([row])
    assert conversations[0].turns[1].reasoning == "I need the order status, so get_order."
    assert conversations[0].turns[3].reasoning is None  # blank reasoning is no reasoning


BAD_ROWS = [
    (apigen_row([{"from": "robot", "value": "x"}]), "conversations[0].from"),
    (apigen_row([{"from": "human", "value": "x"}, {"from": "function_call", "value": "{not json"}]), "conversations[1].value"),
    (apigen_row([{"from": "human", "value": "x"}, call("get_order", [1, 2])]), "conversations[1].value.arguments"),
    ({"system": "s", "tools": "[{broken", "conversations": [{"from": "human", "value": "x"}]}, "tools"),
    ({"system": "s", "tools": "[]"}, "conversations"),
    ("not an object", "<row>"),
]


@pytest.mark.parametrize("bad_row, field_name", BAD_ROWS)
def test_apigen_bad_row_raises_naming_file_row_and_field(bad_row, field_name):
    with pytest.raises(DataError) as caught:
        parse_apigen_rows([GOOD_ROW, bad_row], source="rows.json")
    message = str(caught.value)
    assert message.startswith(f"rows.json: row 1: field {field_name!r}")
    assert (caught.value.row, caught.value.field) == (1, field_name)


def test_apigen_bad_rows_are_skipped_and_counted_in_skip_mode():
    rows = [GOOD_ROW] + [bad for bad, _ in BAD_ROWS] + [GOOD_ROW]
    conversations, stats = parse_apigen_rows(rows, on_error="skip")
    assert len(conversations) == 2 and stats.conversations == 2
    assert stats.rows == len(rows) and stats.skipped == len(BAD_ROWS)
    assert stats.skipped_reasons[0].startswith("row 1: field 'conversations[0].from'")
    assert len({conversation.id for conversation in conversations}) == 2


def test_apigen_file_round_trip_and_jsonl(tmp_path: Path):
    array_file = tmp_path / "apigen.json"
    array_file.write_text(json.dumps([GOOD_ROW, GOOD_ROW]))
    lines_file = tmp_path / "apigen.jsonl"
    lines_file.write_text("\n".join(json.dumps(row) for row in [GOOD_ROW, GOOD_ROW]) + "\n")
    from_array, stats = load_conversations(array_file)
    from_lines, _ = load_conversations(lines_file)
    assert stats.format == "apigen" and len(from_array) == 2
    assert [c.turns for c in from_array] == [c.turns for c in from_lines]
    assert [c.id for c in from_array] == ["apigen-0", "apigen-1"]


def test_unreadable_file_errors(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations(tmp_path / "missing.json")
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(DataError, match="cannot detect the format"):
        load_conversations(odd)
    with pytest.raises(ValueError, match="format must be one of"):
        load_conversations(odd, format="sharegpt")


# --- tau-bench ---------------------------------------------------------------------------------


def tau_row(reward, task_id=1, trial=0):
    return {"task_id": task_id, "trial": trial, "reward": reward, "traj": [
        {"role": "system", "content": "Airline policy."},
        {"role": "user", "content": "Cancel reservation ABC123."},
        {"role": "assistant", "content": "Let me look it up first.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_reservation_details",
                                                          "arguments": '{"reservation_id": "ABC123"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_reservation_details", "content": '{"status": "ok"}'},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c2", "type": "function", "function": {"name": "cancel_reservation", "arguments": '{"reservation_id": "ABC123"}'}}]},
        {"role": "tool", "tool_call_id": "c2", "name": "cancel_reservation", "content": "cancelled"},
        {"role": "assistant", "content": "Your reservation is cancelled."},
    ]}


def test_tau_reward_filter_reasoning_and_tools_json(tmp_path: Path):
    (tmp_path / "tools.json").write_text(json.dumps([{"type": "function", "function": {
        "name": "get_reservation_details", "description": "d", "parameters": {"type": "object", "properties": {}}}}]))
    untested = tau_row(None, task_id=3)
    del untested["reward"]
    path = tmp_path / "trajectories.json"
    path.write_text(json.dumps([tau_row(1.0), tau_row(0.0, task_id=2), untested]))

    kept, stats = load_conversations(path)
    assert stats.format == "tau" and stats.filtered_failed == 1
    assert [conversation.id for conversation in kept] == ["tau-1-0", "tau-3-0"]  # no reward key: kept
    everything, stats_all = load_conversations(path, include_failed=True)
    assert len(everything) == 3 and stats_all.filtered_failed == 0

    conversation = kept[0]
    assert conversation.system == "Airline policy."
    assert conversation.tools[0]["function"]["name"] == "get_reservation_details"
    assert stats.undeclared_tools == {"cancel_reservation": 2}  # declared only in the row's tools.json
    samples = conversation_samples(conversation)
    assert [(sample.target["kind"], sample.reasoning) for sample in samples] == [
        ("tool_call", "Let me look it up first."), ("tool_call", None), ("answer", None)]
    assert samples[0].target == {"kind": "tool_call", "name": "get_reservation_details",
                                 "arguments": {"reservation_id": "ABC123"}}


def test_tau_bad_row_names_field(tmp_path: Path):
    row = tau_row(1.0)
    row["traj"][2]["tool_calls"][0]["function"]["arguments"] = "{oops"
    path = tmp_path / "t.json"
    path.write_text(json.dumps([tau_row(1.0), row]))
    with pytest.raises(DataError, match=r"t\.json: row 1: field 'traj\[2\]\.tool_calls\[0\]\.arguments'"):
        load_conversations(path, format="tau")
    kept, stats = load_conversations(path, format="tau", on_error="skip")
    assert len(kept) == 1 and stats.skipped == 1


def test_tau_real_trajectories(shared_dir: Path):
    path = shared_dir / "data" / "tau-bench-airline" / "trajectories.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    raw = json.loads(path.read_text())
    conversations, stats = load_conversations(path)
    solved = [row for row in raw if row["reward"] == 1.0]
    assert stats.format == "tau" and stats.skipped == 0
    assert len(conversations) == len(solved) == 84 and stats.filtered_failed == 200 - 84
    assert all(len(conversation.tools) == 14 for conversation in conversations)

    # one sample per assistant message, target = its first tool call or its text
    samples = make_samples(conversations)
    expected = []
    for row in solved:
        for message in row["traj"]:
            if message["role"] != "assistant":
                continue
            if message.get("tool_calls"):
                function = message["tool_calls"][0]["function"]
                expected.append({"kind": "tool_call", "name": function["name"],
                                 "arguments": json.loads(function["arguments"])})
            else:
                expected.append({"kind": "answer", "text": message["content"]})
    assert [sample.target for sample in samples] == expected
    with_text = sum(1 for row in solved for m in row["traj"] if m["role"] == "assistant" and m.get("tool_calls") and m.get("content"))
    assert sum(1 for sample in samples if sample.reasoning) == with_text > 0

    everything, _ = load_conversations(path, include_failed=True)
    assert len(everything) == 200 and len({conversation.id for conversation in everything}) == 200


# --- ALMITA CSV --------------------------------------------------------------------------------

ALMITA_CSV = """Conversation ID,Turn,Speaker,Message,Tool Name,Arguments,Procedure
c1,2,agent,,check_balance,"{""account"": ""42""}",Check the balance after verifying the account.
c1,1,customer,What's my balance on account 42?,,,
c1,3,tool,balance: 10 EUR,,,
c1,4,agent,Your balance is 10 EUR.,,,
c2,1,customer,Hello,,,
c2,2,agent,Hi! How can I help?,,,
"""


def test_almita_csv_maps_columns_by_header(tmp_path: Path):
    path = tmp_path / "almita.csv"
    path.write_text(ALMITA_CSV)
    assert detect_format(ALMITA_CSV) == "almita"
    conversations, stats = load_conversations(path)
    assert stats.format == "almita" and stats.conversations == 2
    first = conversations[0]
    assert first.id == "c1" and first.system == "Check the balance after verifying the account."
    assert [turn.role for turn in first.turns] == ["user", "tool_call", "tool", "assistant"]  # ordered by Turn
    assert first.turns[1] == Turn("tool_call", name="check_balance", arguments={"account": "42"})
    assert first.turns[2].name == "check_balance"
    assert [sample.target["kind"] for sample in make_samples(conversations)] == ["tool_call", "answer", "answer"]


def test_almita_header_mismatch_lists_expected_and_found(tmp_path: Path):
    path = tmp_path / "other.csv"
    path.write_text("ticket,who,words\n1,user,hi\n")
    with pytest.raises(DataError) as caught:
        load_conversations(path, format="almita")
    message = str(caught.value)
    assert "lacks conversation_id, role, content" in message
    assert "Found columns: ticket, who, words" in message
    assert "conversation_id (required): one of conversation_id" in message


def test_almita_bad_line_raise_and_skip(tmp_path: Path):
    path = tmp_path / "bad.csv"
    path.write_text(ALMITA_CSV.replace("c2,2,agent,Hi!", "c2,2,wizard,Hi!"))
    with pytest.raises(DataError, match=r"row 1: field 'line 7: Speaker': unknown role 'wizard'"):
        load_conversations(path)
    conversations, stats = load_conversations(path, on_error="skip")
    assert [conversation.id for conversation in conversations] == ["c1"] and stats.skipped == 1


# --- format detection, synthetic specs ---------------------------------------------------------


def test_detect_format_by_content():
    assert detect_format(json.dumps([GOOD_ROW])) == "apigen"
    assert detect_format(json.dumps([tau_row(1.0)])) == "tau"
    assert detect_format(json.dumps(GOOD_ROW) + "\n" + json.dumps(GOOD_ROW)) == "apigen"  # JSON lines
    with pytest.raises(DataError, match="cannot detect"):
        detect_format("just some words\n")


def test_load_dataset_rejects_unknown_synthetic_split():
    with pytest.raises(ValueError, match="unknown synthetic split 'dev'"):
        load_dataset("synthetic:dev")


def test_load_dataset_synthetic_train():
    conversations, stats = load_dataset("synthetic:train", seed=0)
    again, _ = load_dataset("synthetic:train", seed=0)
    assert stats.skipped == 0 and len(conversations) > 0
    assert [c.turns for c in conversations] == [c.turns for c in again]
    assert make_samples(conversations)


# --- samples and splits ------------------------------------------------------------------------


def test_samples_context_is_everything_before_the_action():
    conversations, _ = parse_apigen_rows([GOOD_ROW])
    conversation = conversations[0]
    samples = conversation_samples(conversation)
    assert [sample.turn_index for sample in samples] == [1, 3]
    assert samples[0].context == conversation.turns[:1] and samples[1].context == conversation.turns[:3]
    assert samples[0].target == {"kind": "tool_call", "name": "get_order", "arguments": {"order_id": "#A1"}}
    assert samples[1].tools is conversation.tools and samples[1].system == conversation.system


def test_make_samples_reasoning_filters_do_not_mutate():
    turns = [Turn("user", "q"), Turn("tool_call", name="get_order", arguments={"order_id": "1"}, reasoning="look it up"),
             Turn("tool", "ok"), Turn("assistant", "done")]
    conversation = Conversation("c", "s", [], turns)
    assert [s.turn_index for s in make_samples([conversation], only_with_reasoning=True)] == [1]
    stripped = make_samples([conversation], strip_reasoning=True)
    assert [s.reasoning for s in stripped] == [None, None]
    assert conversation.turns[1].reasoning == "look it up"  # the source is untouched
    stripped[0].target["arguments"]["order_id"] = "changed"
    assert conversation.turns[1].arguments == {"order_id": "1"}


def test_split_by_conversation_is_disjoint_sized_and_deterministic():
    conversations = [Conversation(f"c{i}", "", [], [Turn("user", str(i))]) for i in range(23)]
    parts = split_conversations(conversations, {"train": 0.7, "test": 0.2, "dev": 0.1}, seed=5)
    sizes = {name: len(part) for name, part in parts.items()}
    assert sizes == {"train": 16, "test": 5, "dev": 2}  # 16.1, 4.6, 2.3 -> largest remainder
    ids = [conversation.id for part in parts.values() for conversation in part]
    assert sorted(ids) == sorted(conversation.id for conversation in conversations)  # disjoint, complete
    assert split_conversations(conversations, {"train": 0.7, "test": 0.2, "dev": 0.1}, seed=5) == parts
    other = split_conversations(conversations, {"train": 0.7, "test": 0.2, "dev": 0.1}, seed=6)
    assert [c.id for c in other["test"]] != [c.id for c in parts["test"]]
    with pytest.raises(ValueError, match="sum to"):
        split_conversations(conversations, {"a": 0.8, "b": 0.3}, seed=0)
    duplicated = conversations + [conversations[0]]
    with pytest.raises(ValueError, match="unique"):
        split_conversations(duplicated, {"a": 1.0}, seed=0)
