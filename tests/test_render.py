"""Rendering (ids + loss masks, prompt prefix, truncation), the Qwen3 template, the tiny tokenizer."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.format import IM_END, SPECIAL_TOKENS, STOP_STRINGS, format_completion
from data.render import (
    ContextTooLong, Rendered, completion_ids, encode_text, end_of_turn_id, history_cuts, render, render_each,
    render_prompt, stop_sequences, stop_token_ids,
)
from data.samples import conversation_samples
from data.tokenizer import load_tokenizer, tokenizer_corpus, train_tokenizer
from data.types import Conversation, Sample, Turn
from tests.conftest import SHARED

TOOLS = [{"type": "function", "function": {
    "name": "get_order", "description": "Look up an order.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]


def exchange(number: int) -> list[Turn]:
    """user -> tool call -> tool result -> answer, with text unique to `number`."""
    order = f"A{number}"
    return [
        Turn("user", f"Where is my order {order}? It is exchange number {number}."),
        Turn("tool_call", name="get_order", arguments={"order_id": order}, reasoning=f"Look up {order}."),
        Turn("tool", f'{{"order_id": "{order}", "status": "shipped"}}', name="get_order"),
        Turn("assistant", f"Order {order} has shipped."),
    ]


CONVERSATION = Conversation("conv-1", "You are a support agent.", TOOLS, exchange(1) + exchange(2) + exchange(3))


@pytest.fixture(scope="module")
def tiny_tokenizer():
    texts = list(tokenizer_corpus([CONVERSATION])) * 3 + ["Where is my parcel? Cancel it. Thanks!"]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def qwen3():
    path = SHARED / "tokenizers" / "qwen3"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"{path} is absent (the real Qwen3 tokenizer lives in ../shared)")
    return load_tokenizer(path)


def sample_at(turn_index: int, conversation: Conversation = CONVERSATION) -> Sample:
    return next(s for s in conversation_samples(conversation) if s.turn_index == turn_index)


def check_rendering(sample: Sample, tokenizer, rendered, with_reasoning: bool = True) -> None:
    """The invariants every rendering must satisfy."""
    completion = completion_ids(sample, tokenizer, with_reasoning=with_reasoning)
    start = rendered.prompt_length
    assert len(rendered.input_ids) == len(rendered.loss_mask)
    assert rendered.loss_mask == [0] * start + [1] * len(completion)  # exactly the completion
    assert rendered.input_ids[start:] == completion
    assert rendered.input_ids[-1] == end_of_turn_id(tokenizer)
    expected_text = format_completion(sample.target, sample.reasoning if with_reasoning else None) + IM_END
    assert tokenizer.decode(rendered.input_ids[start:]) == expected_text
    if rendered.dropped_turns == 0:
        prompt = render_prompt(sample, tokenizer)
        assert prompt.input_ids == rendered.input_ids[:start]  # token for token the prefix
        assert prompt.loss_mask == [0] * start and prompt.prompt_length == start


@pytest.mark.parametrize("turn_index", [1, 3, 5, 11])
@pytest.mark.parametrize("with_reasoning", [True, False])
def test_render_mask_covers_exactly_the_completion(tiny_tokenizer, turn_index, with_reasoning):
    sample = sample_at(turn_index)
    before = copy.deepcopy(sample)
    rendered = render(sample, tiny_tokenizer, with_reasoning=with_reasoning)
    check_rendering(sample, tiny_tokenizer, rendered, with_reasoning)
    assert rendered.dropped_turns == 0
    prompt_text = tiny_tokenizer.decode(rendered.input_ids[: rendered.prompt_length])
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert sample == before  # rendering never mutates its input
    if sample.target["kind"] == "tool_call" and not with_reasoning:
        completion_text = tiny_tokenizer.decode(rendered.input_ids[rendered.prompt_length:])
        assert completion_text.startswith("<think>\n\n</think>\n\n<tool_call>\n")


texts = st.text(min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(user_texts=st.lists(texts, min_size=1, max_size=4), answer=texts, reasoning=st.one_of(st.none(), texts),
       arguments=st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), texts), max_size=3))
def test_render_properties_on_random_conversations(tiny_tokenizer, user_texts, answer, reasoning, arguments):
    turns = []
    for text in user_texts:
        turns += [Turn("user", text), Turn("tool_call", name="get_order", arguments=arguments), Turn("tool", text)]
    turns.append(Turn("assistant", answer, reasoning=reasoning))
    conversation = Conversation("random", "sys", TOOLS, turns)
    for sample in conversation_samples(conversation):
        check_rendering(sample, tiny_tokenizer, render(sample, tiny_tokenizer))


# --- block-wise cached encoding ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL_TOKENS + ("\n", " "))), max_size=12))
def test_block_encoding_equals_plain_encoding(tiny_tokenizer, pieces):
    text = "".join(pieces)
    assert encode_text(tiny_tokenizer, text) == tiny_tokenizer.encode(text, add_special_tokens=False)
    assert encode_text(tiny_tokenizer, text) == tiny_tokenizer.encode(text, add_special_tokens=False)  # from cache


def test_block_cache_follows_added_tokens():
    tokenizer = train_tokenizer(list(tokenizer_corpus([CONVERSATION])), vocab_size=300)
    text = "Where is my order?<|im_end|>\n<|im_start|>user\nWhere is my order?<|im_end|>"
    before = encode_text(tokenizer, text)
    assert tokenizer.add_tokens(["re is my or"]) == 1
    after = encode_text(tokenizer, text)
    assert after != before and after == tokenizer.encode(text, add_special_tokens=False)


# --- truncation ---------------------------------------------------------------------------------


def test_history_cuts_drop_whole_exchanges_then_oldest_actions():
    history = [Turn("assistant", "hello"), Turn("user", "u1"), Turn("tool_call", name="f", arguments={}), Turn("tool", "r"),
               Turn("assistant", "a1"), Turn("user", "u2"), Turn("tool_call", name="f", arguments={}), Turn("tool", "r"),
               Turn("tool", "r"), Turn("tool_call", name="g", arguments={}), Turn("tool", "r")]
    assert history_cuts(history) == [
        list(range(11)),  # everything
        list(range(1, 11)),  # the greeting before the first user turn
        list(range(5, 11)),  # the whole first exchange
        [5, 9, 10],  # inside the last exchange: its user turn + the newest call and its result
    ]
    assert history_cuts([]) == [[]]


def test_truncation_drops_oldest_exchanges_and_keeps_system_tools_target(tiny_tokenizer):
    sample = sample_at(11)  # the answer of exchange 3; history = exchanges 1, 2 and three turns of 3
    full = render(sample, tiny_tokenizer)
    without_first = render(Sample(**{**sample.__dict__, "context": sample.context[4:]}), tiny_tokenizer)
    limit = len(without_first.input_ids)
    rendered = render(sample, tiny_tokenizer, max_length=limit)
    assert rendered.dropped_turns == 4 and len(rendered.input_ids) <= limit < len(full.input_ids)
    assert rendered.input_ids == without_first.input_ids
    check_rendering(sample, tiny_tokenizer, rendered)
    text = tiny_tokenizer.decode(rendered.input_ids)
    assert "You are a support agent." in text and '"name": "get_order"' in text  # system, tools kept
    assert "exchange number 1" not in text and "exchange number 2" in text
    # the prompt for generation, with room for the completion, is exactly the prefix
    completion_length = len(rendered.input_ids) - rendered.prompt_length
    prompt = render_prompt(sample, tiny_tokenizer, max_length=limit, completion_budget=completion_length)
    assert prompt.input_ids == rendered.input_ids[: rendered.prompt_length] and prompt.dropped_turns == 4
    # one token less than what fits two exchanges: the second one goes as well
    shorter = render(sample, tiny_tokenizer, max_length=limit - 1)
    assert shorter.dropped_turns == 8 and "exchange number 2" not in tiny_tokenizer.decode(shorter.input_ids)


def test_truncation_inside_one_long_exchange_keeps_the_request(tiny_tokenizer):
    turns = [Turn("user", "Check orders A1, A2 and A3.")]
    for order in ("A1", "A2", "A3"):
        turns += [Turn("tool_call", name="get_order", arguments={"order_id": order}),
                  Turn("tool", f"{order} shipped " * 10, name="get_order")]
    turns.append(Turn("assistant", "All shipped."))
    sample = conversation_samples(Conversation("long", "sys", TOOLS, turns))[-1]
    full = render(sample, tiny_tokenizer)
    rendered = render(sample, tiny_tokenizer, max_length=len(full.input_ids) - 5)
    text = tiny_tokenizer.decode(rendered.input_ids)
    assert rendered.dropped_turns == 2  # the oldest call and its result, together
    assert "Check orders A1, A2 and A3." in text and "A1 shipped" not in text and "A2 shipped" in text
    check_rendering(sample, tiny_tokenizer, rendered)


def test_context_too_long_names_the_conversation(tiny_tokenizer):
    sample = sample_at(11)
    with pytest.raises(ContextTooLong, match=r"conversation 'conv-1' turn 11: prompt of \d+ tokens \+ \d+ completion tokens > max_length 20"):
        render(sample, tiny_tokenizer, max_length=20)
    with pytest.raises(ContextTooLong):
        render_prompt(sample, tiny_tokenizer, max_length=20)


def test_bad_target_is_a_clear_error(tiny_tokenizer):
    sample = Sample("bad", 0, "", [], [], {"kind": "dance"})
    with pytest.raises(ValueError, match="conversation 'bad' turn 0: bad target"):
        render(sample, tiny_tokenizer)


def test_render_each_counts_skips_logs_the_first_ones_and_keeps_order(tiny_tokenizer):
    def render_one(number: int) -> Rendered:
        if number % 2:  # odd samples do not fit
            raise ContextTooLong(f"conv-{number}", number, 10, 2, 8, 0, 0)
        return Rendered([number], [0], 1, dropped_turns=number % 4)  # 2 and 6 were shortened

    logged: list[str] = []
    result = render_each(list(range(9)), render_one, logged.append, log_prefix="skipped prompt")
    assert [(index, rendered.input_ids) for index, rendered in result.kept] == [(n, [n]) for n in (0, 2, 4, 6, 8)]
    assert (result.too_long, result.shortened) == (4, 2)
    assert logged == [f"skipped prompt: {ContextTooLong(f'conv-{n}', n, 10, 2, 8, 0, 0)}" for n in (1, 3, 5)]
    logged.clear()  # a caller rendering in several calls passes the number of logs it has left
    assert render_each([1, 3], render_one, logged.append, log_limit=1).too_long == 2
    assert len(logged) == 1 and logged[0].startswith("skipped: conversation 'conv-1' turn 1:")
    with pytest.raises(ValueError, match="bad target"):  # any other error is not a skip
        render_each([Sample("bad", 0, "", [], [], {"kind": "dance"})], lambda s: render(s, tiny_tokenizer), logged.append)


def test_render_each_with_real_renderings(tiny_tokenizer):
    samples = conversation_samples(CONVERSATION)
    max_length = len(render_prompt(samples[-1], tiny_tokenizer).input_ids) - 1  # the last one must be shortened
    result = render_each(samples, lambda s: render_prompt(s, tiny_tokenizer, max_length=max_length), print)
    assert [rendered for _, rendered in result.kept] == [render_prompt(s, tiny_tokenizer, max_length=max_length)
                                                         for s in samples]
    assert result.too_long == 0 and result.shortened == sum(r.dropped_turns > 0 for _, r in result.kept) >= 1


# --- special ids ---------------------------------------------------------------------------------


def test_special_ids_of_the_tiny_tokenizer(tiny_tokenizer):
    assert end_of_turn_id(tiny_tokenizer) == tiny_tokenizer.convert_tokens_to_ids(IM_END) == tiny_tokenizer.eos_token_id
    assert stop_token_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]  # eos == end of turn: one id
    sequences = stop_sequences(tiny_tokenizer)
    assert [tiny_tokenizer.decode(ids) for ids in sequences] == list(STOP_STRINGS)


def test_end_of_turn_falls_back_to_eos_without_im_end():
    class NoChatTokens:
        eos_token_id, unk_token_id = 7, 0

        def convert_tokens_to_ids(self, token):
            return self.unk_token_id

    assert end_of_turn_id(NoChatTokens()) == 7 and stop_token_ids(NoChatTokens()) == [7]


# --- the tiny tokenizer ----------------------------------------------------------------------------


def test_tiny_tokenizer_special_tokens_and_round_trip(tiny_tokenizer):
    assert [tiny_tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tiny_tokenizer.eos_token, tiny_tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert len(tiny_tokenizer) <= 400 and not getattr(tiny_tokenizer, "chat_template", None)
    text = format_completion({"kind": "answer", "text": "Hi é 😀"}, "why") + IM_END
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    for token in SPECIAL_TOKENS[3:]:
        if token in text:
            assert tiny_tokenizer.convert_tokens_to_ids(token) in ids  # tags stay one token
    assert tiny_tokenizer.decode(ids) == text
    # chat tokens are special (dropped), tags are not (the reward parser needs them)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text[: -len(IM_END)]
    with tempfile.TemporaryDirectory() as directory:
        train_tokenizer(["abc"], vocab_size=300, out_dir=directory)
        tiny_tokenizer.save_pretrained(directory)
        reloaded = load_tokenizer(directory)
    assert reloaded.encode(text, add_special_tokens=False) == ids
    assert reloaded.decode(ids, skip_special_tokens=True) == text[: -len(IM_END)]


def test_tiny_tokenizer_is_deterministic_and_checks_vocab_size():
    corpus = list(tokenizer_corpus([CONVERSATION]))
    assert train_tokenizer(corpus, vocab_size=350).get_vocab() == train_tokenizer(corpus, vocab_size=350).get_vocab()
    with pytest.raises(ValueError, match="vocab_size must be at least 267"):
        train_tokenizer(corpus, vocab_size=100)
    with pytest.raises(FileNotFoundError):
        load_tokenizer("/nonexistent/tokenizer")


# --- the real Qwen3 tokenizer and its chat template ---------------------------------------------


def qwen3_messages(sample: Sample) -> list[dict]:
    """The messages Qwen3's template expects, written out by hand for the test."""
    messages = [{"role": "system", "content": sample.system}]
    for turn in sample.context:
        if turn.role == "user":
            messages.append({"role": "user", "content": turn.content})
        elif turn.role == "tool_call":
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [{"function": {"name": turn.name, "arguments": turn.arguments}}]})
        elif turn.role == "tool":
            messages.append({"role": "tool", "content": turn.content})
        else:
            messages.append({"role": "assistant", "content": f"<answer>{turn.content}</answer>"})
    return messages


@pytest.mark.parametrize("turn_index", [1, 7, 11])
def test_qwen3_template_with_tools(qwen3, turn_index):
    sample = sample_at(turn_index)
    rendered = render(sample, qwen3)
    check_rendering(sample, qwen3, rendered)
    prompt_text = qwen3.decode(rendered.input_ids[: rendered.prompt_length])
    assert prompt_text == qwen3.apply_chat_template(qwen3_messages(sample), tools=TOOLS, add_generation_prompt=True,
                                                    tokenize=False)
    assert prompt_text.startswith("<|im_start|>system\nYou are a support agent.\n\n# Tools\n")
    assert json.dumps(TOOLS[0]) in prompt_text
    if turn_index > 4:  # history tool calls and results as Qwen3 writes them
        assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_order", "arguments": {"order_id": "A1"}}\n'
                '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n') in prompt_text
        assert "<|im_start|>assistant\n<answer>Order A1 has shipped.</answer><|im_end|>" in prompt_text
    # Qwen3's own rendering of the target turn (reasoning included) is exactly our completion
    target = sample.target
    if target["kind"] == "tool_call":
        last = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": target["name"], "arguments": target["arguments"]}}]}
    else:
        last = {"role": "assistant", "content": f"<answer>{target['text']}</answer>"}
    last["reasoning_content"] = sample.reasoning or ""
    whole = qwen3.apply_chat_template(qwen3_messages(sample) + [last], tools=TOOLS, tokenize=False)
    assert whole == qwen3.decode(rendered.input_ids) + "\n"


def test_qwen3_block_encoding(qwen3):
    prompt = render_prompt(sample_at(11), qwen3)
    text = qwen3.decode(prompt.input_ids)
    assert prompt.input_ids == qwen3.encode(text, add_special_tokens=False)
    odd = "  x<|im_end|>\n\n<|im_start|>  é😀<|im_end|><|im_end|>tail \n"
    assert encode_text(qwen3, odd) == qwen3.encode(odd, add_special_tokens=False)


def test_qwen3_conversation_opening_with_the_agent(qwen3):
    sample = Sample("greeting", 0, "", [], [], {"kind": "answer", "text": "Hi, how can I help?"})
    rendered = render(sample, qwen3)
    assert qwen3.decode(rendered.input_ids) == "<|im_start|>assistant\n<think>\n\n</think>\n\n<answer>Hi, how can I help?</answer><|im_end|>"
    check_rendering(sample, qwen3, rendered)


def test_qwen3_special_ids(qwen3):
    assert end_of_turn_id(qwen3) == 151645 and stop_token_ids(qwen3) == [151645]
    assert stop_sequences(qwen3)[0] == [qwen3.convert_tokens_to_ids("</tool_call>")]
    assert [qwen3.decode(ids) for ids in stop_sequences(qwen3)] == list(STOP_STRINGS)


def test_qwen3_truncation_on_real_tau_conversation(qwen3, shared_dir: Path):
    from data.loaders import load_conversations

    path = shared_dir / "data" / "tau-bench-airline" / "trajectories.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    conversations, _ = load_conversations(path)
    conversation = max(conversations[:20], key=lambda c: len(c.turns))
    sample = conversation_samples(conversation)[-1]
    full = render(sample, qwen3)
    rendered = render(sample, qwen3, max_length=len(full.input_ids) - 200)
    assert rendered.dropped_turns > 0 and len(rendered.input_ids) <= len(full.input_ids) - 200
    check_rendering(sample, qwen3, rendered)
    text = qwen3.decode(rendered.input_ids[: rendered.prompt_length])
    after_system = text.split("</tool_call><|im_end|>\n", 1)[1]  # the end of Qwen3's tools preamble
    assert after_system.startswith("<|im_start|>user\n") and not after_system.startswith("<|im_start|>user\n<tool_response>")
    budget = len(rendered.input_ids) - rendered.prompt_length
    prompt = render_prompt(sample, qwen3, max_length=len(full.input_ids) - 200, completion_budget=budget)
    assert prompt.input_ids == rendered.input_ids[: rendered.prompt_length]


# --- packing a conversation's samples into one sequence (stage-1 SFT) -------------------------


def test_render_conversation_packs_every_action_exactly(tiny_tokenizer):
    from data.render import render_conversation

    conversation = Conversation("c-pack", "SYS", TOOLS, exchange(1) + exchange(2))
    samples = conversation_samples(conversation)
    singles = [render(sample, tiny_tokenizer, with_reasoning=False) for sample in samples]
    packed, merged = render_conversation(samples, tiny_tokenizer)
    assert len(packed) == 1 and merged == len(samples) - 1
    sequence = packed[0]
    assert sequence.input_ids == singles[-1].input_ids
    # every sample's completion is masked at exactly its own positions, nothing else is
    expected = [0] * len(sequence.input_ids)
    for single in singles:
        assert sequence.input_ids[: len(single.input_ids)] == single.input_ids
        expected[single.prompt_length: len(single.input_ids)] = [1] * (len(single.input_ids) - single.prompt_length)
    assert sequence.loss_mask == expected
    assert sum(sequence.loss_mask) == sum(sum(single.loss_mask) for single in singles)


def test_render_conversation_falls_back_when_history_is_cut(tiny_tokenizer):
    from data.render import render_conversation

    conversation = Conversation("c-cut", "SYS", TOOLS, exchange(1) + exchange(2) + exchange(3))
    samples = conversation_samples(conversation)
    full = render(samples[-1], tiny_tokenizer, with_reasoning=False)
    limit = len(full.input_ids) - 5  # the last samples must drop history: they cannot cover the earlier ones
    packed, merged = render_conversation(samples, tiny_tokenizer, max_length=limit)
    singles = [render(sample, tiny_tokenizer, max_length=limit, with_reasoning=False) for sample in samples]
    assert sum(sum(r.loss_mask) for r in packed) == sum(sum(r.loss_mask) for r in singles)
    assert all(len(r.input_ids) <= limit for r in packed)
    assert len(packed) == len(samples) - merged and len(packed) > 1


def test_render_conversation_with_qwen3_template_keeps_samples_apart(qwen3):
    """Qwen3's template shows history without think blocks: no sample covers another."""
    from data.render import render_conversation

    conversation = Conversation("c-q", "SYS", TOOLS, exchange(1))
    samples = conversation_samples(conversation)
    packed, merged = render_conversation(samples, qwen3)
    assert merged == 0
    assert [r.input_ids for r in packed] == [render(s, qwen3, with_reasoning=False).input_ids for s in samples]
