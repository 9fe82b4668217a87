"""The prompt text (data.chat_text): the project's ChatML, compact tool signatures, and chat templates
that drop tools (the sentinel probe, and the project's rendering inside such templates)."""

from __future__ import annotations

import copy
import json

import pytest

from data.chat_text import chatml_prompt
from data.format import IM_END, format_completion
from data.render import completion_ids, end_of_turn_id, render, render_prompt, stop_token_ids
from data.types import Sample, Turn
from tests.test_render import TOOLS, exchange, qwen3, sample_at, tiny_tokenizer  # noqa: F401 (qwen3, tiny_tokenizer: fixtures)


# --- the project's ChatML template (tokenizer without a chat template) --------------------------


def test_chatml_prompt_layout():
    history = exchange(1)[:3]
    text = chatml_prompt("SYS", TOOLS, history)
    signature = "get_order(order_id: string): Look up an order."
    assert text == (
        "<|im_start|>system\nSYS\n\n# Tools\n\nCall one tool as <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n"
        "</tool_call> or reply to the user as <answer>...</answer>.\n<tools>\n" + signature + "\n</tools><|im_end|>\n"
        "<|im_start|>user\nWhere is my order A1? It is exchange number 1.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"get_order\", \"arguments\": {\"order_id\": \"A1\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"order_id\": \"A1\", \"status\": \"shipped\"}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # consecutive tool results share one user turn; no tools and no system -> no system block
    two_results = [Turn("user", "q"), Turn("tool_call", name="f", arguments={}), Turn("tool", "r1"), Turn("tool", "r2")]
    assert chatml_prompt("", [], two_results).endswith(
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert chatml_prompt("", [], [Turn("user", "q")]) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"


def test_tool_signature_is_compact_and_complete():
    from data.chat_text import tool_signature

    tool = {"type": "function", "function": {"name": "book", "description": "Book a flight.", "parameters": {
        "type": "object",
        "properties": {"insurance": {"type": "boolean"}, "cabin": {"type": "string", "enum": ["basic", "business"]},
                       "ids": {"type": "array", "items": {"type": "string"}}, "n": {"type": "integer"}},
        "required": ["cabin", "n"]}}}
    # required parameters first, optional ones marked with '?', enums spelled out
    assert tool_signature(tool) == "book(cabin: basic|business, n: integer, insurance?: boolean, ids?: array[string]): Book a flight."
    assert tool_signature({"name": "ping"}) == "ping()"



# --- chat templates that drop tools: the sentinel probe and the project's rendering inside them ----
#
# Three tokenizers: Qwen3 (its template renders tools, tool calls and tool results: structured
# fields), SmolLM2-135M-Instruct (its ChatML template renders only role + content: the project's
# own rendering goes inside its turn markers), and the tiny project tokenizer (no template: the
# project's ChatML).

THREE_TOKENIZERS = ["qwen3", "smollm2_tokenizer", "tiny_tokenizer"]

# A template that renders role + content in ChatML and refuses the `tool` role.
NO_TOOL_ROLE_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'tool' %}"
    "{{ raise_exception('this template has no tool role') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def synthetic_test_samples() -> list[Sample]:
    from data.loaders import load_dataset
    from data.samples import make_samples

    conversations, _ = load_dataset("synthetic:test")
    samples = make_samples(conversations)
    assert len(samples) > 1000 and any(turn.role == "tool" for sample in samples for turn in sample.context)
    return samples


@pytest.fixture
def fresh_support_cache(monkeypatch):
    """An empty `template_support` cache for this test (restored after it): the probe really runs,
    and nothing this test probes leaks into the others."""
    import data.chat_text

    monkeypatch.setattr(data.chat_text, "_SUPPORT_CACHE", {})


# tokenizer fixture name -> the prompt text of every synthetic:test sample (rendered once per module)
_TEST_PROMPTS: dict[str, list[str]] = {}


def synthetic_test_prompts(name: str, tokenizer, samples: list[Sample]) -> list[str]:
    from data.chat_text import prompt_text

    if name not in _TEST_PROMPTS:
        _TEST_PROMPTS[name] = [prompt_text(tokenizer, s.system, s.tools, s.context, s.conversation_id) for s in samples]
    return _TEST_PROMPTS[name]


def history_text(turn: Turn) -> str:
    """The text of a history turn every rendering must show verbatim (actions without reasoning)."""
    from data.format import tool_call_json

    if turn.role == "tool_call":
        return tool_call_json(turn.name, turn.arguments or {})
    return turn.content  # user text, tool result, answer text


def test_template_support_of_qwen3(qwen3, fresh_support_cache):
    """The probe sees that Qwen3's template shows tools, tool calls and tool results."""
    from data.chat_text import TemplateSupport, template_support

    assert template_support(qwen3) == TemplateSupport(tools=True, tool_calls=True, tool_results=True)
    assert template_support(qwen3).complete


def test_template_support_of_smollm2_and_of_no_template(smollm2_tokenizer, tiny_tokenizer, fresh_support_cache):
    """The probe sees that SmolLM2's template drops tools and tool calls, and that a tokenizer
    without a template shows nothing."""
    from data.chat_text import TemplateSupport, template_support

    smollm2 = template_support(smollm2_tokenizer)
    assert (smollm2.tools, smollm2.tool_calls) == (False, False) and not smollm2.complete
    assert template_support(tiny_tokenizer) == TemplateSupport(False, False, False)
    assert not template_support(tiny_tokenizer).complete


def test_template_support_survives_a_template_that_raises_on_the_tool_role(tiny_tokenizer, fresh_support_cache):
    """A template that raises on a `tool` message is reported as not showing tool results (no
    exception), and prompts still render through it: tool results become user turns."""
    from data.chat_text import prompt_text, template_support

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = NO_TOOL_ROLE_TEMPLATE
    with pytest.raises(Exception, match="no tool role"):  # the template really refuses the role
        tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], tokenize=False)
    support = template_support(tokenizer)
    assert support.tool_results is False and not support.complete
    sample = sample_at(7)  # history holds a tool call and its result
    text = prompt_text(tokenizer, sample.system, sample.tools, sample.context)
    assert text == chatml_prompt(sample.system, sample.tools, sample.context)
    assert '<|im_start|>user\n<tool_response>\n{"order_id": "A1", "status": "shipped"}\n</tool_response>' in text
    assert not getattr(tiny_tokenizer, "chat_template", None)  # the shared fixture is untouched


def test_smollm2_template_drops_tools_and_tool_calls_on_its_own(smollm2_tokenizer):
    """The original bug: SmolLM2's template, given `tools=` and `tool_calls`, silently renders
    neither, so structured fields cannot be trusted without probing; `prompt_text` shows both."""
    from data.chat_text import prompt_text

    tool = {"type": "function", "function": {"name": "sentinel_defined_tool", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    call = {"type": "function", "function": {"name": "sentinel_called_tool", "arguments": {"key": "sentinel_value"}}}
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "user", "content": "V"}]
    own = smollm2_tokenizer.apply_chat_template(messages, tools=[tool], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nU<|im_end|>" in own  # it did render the conversation ...
    for lost in ("sentinel_defined_tool", "sentinel_called_tool", "sentinel_value"):
        assert lost not in own  # ... but not the tools nor the tool call
    history = [Turn("user", "U"), Turn("tool_call", name="sentinel_called_tool", arguments={"key": "sentinel_value"}),
               Turn("user", "V")]
    ours = prompt_text(smollm2_tokenizer, "S", [tool], history)
    for shown in ("sentinel_defined_tool", '{"name": "sentinel_called_tool", "arguments": {"key": "sentinel_value"}}'):
        assert shown in ours


@pytest.mark.parametrize("tokenizer_name", THREE_TOKENIZERS)
def test_prompts_lose_nothing_on_synthetic_test(request, tokenizer_name, synthetic_test_samples):
    """Every sample of synthetic:test shows, with each tokenizer, every tool (name and parameter
    names) and every history turn in order: user texts, tool calls (name + arguments JSON, each
    argument value), tool results and answers."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    texts = synthetic_test_prompts(tokenizer_name, tokenizer, synthetic_test_samples)
    for sample, text in zip(synthetic_test_samples, texts):
        where = f"{tokenizer_name}: {sample.conversation_id} turn {sample.turn_index}"
        for tool in sample.tools:
            function = tool.get("function", tool)
            assert function["name"] in text, where
            for parameter in (function.get("parameters") or {}).get("properties") or {}:
                assert parameter in text, (where, parameter)
        position = 0
        for turn in sample.context:
            if turn.role == "tool_call":
                assert turn.name in text, where
                for value in (turn.arguments or {}).values():
                    shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                    assert shown in text, (where, shown)
            expected = history_text(turn)
            found = text.find(expected, position)
            assert found >= 0, (where, turn.role, expected)  # present, after the turns before it
            position = found + len(expected)
        assert text.endswith("<|im_start|>assistant\n"), where  # the generation prompt closes it


def test_smollm2_prompts_are_exactly_the_project_chatml(smollm2_tokenizer, synthetic_test_samples):
    """Inside SmolLM2's ChatML template the project's rendering gives exactly `chatml_prompt`, for
    every sample of synthetic:test (the tiny tokenizer's format, so its SFT data carries over)."""
    from data.chat_text import prompt_text

    texts = synthetic_test_prompts("smollm2_tokenizer", smollm2_tokenizer, synthetic_test_samples)
    for sample, text in zip(synthetic_test_samples, texts):
        assert text == chatml_prompt(sample.system, sample.tools, sample.context), sample.conversation_id
    # synthetic:test has no consecutive tool results: they share one user turn, as in chatml_prompt
    history = [Turn("user", "q"), Turn("tool_call", name="get_order", arguments={"order_id": "A1"}),
               Turn("tool", "r1"), Turn("tool", "r2"), Turn("assistant", "done"), Turn("user", "thanks")]
    text = prompt_text(smollm2_tokenizer, "SYS", TOOLS, history)
    assert text == chatml_prompt("SYS", TOOLS, history)
    assert "<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>" in text


def test_smollm2_without_its_template_falls_back_to_chatml(smollm2_tokenizer, monkeypatch, fresh_support_cache):
    """With the template removed, the same tokenizer gets the project's ChatML and no support."""
    from data.chat_text import TemplateSupport, prompt_text, template_support

    monkeypatch.setattr(smollm2_tokenizer, "chat_template", None)  # restored after the test
    sample = sample_at(7)
    assert template_support(smollm2_tokenizer) == TemplateSupport(False, False, False)
    assert prompt_text(smollm2_tokenizer, sample.system, sample.tools, sample.context) == chatml_prompt(
        sample.system, sample.tools, sample.context)


def test_smollm2_end_of_turn_is_im_end(smollm2_tokenizer):
    """SmolLM2 ends a turn with `<|im_end|>` (id 2), which is also its EOS: one stop id."""
    assert end_of_turn_id(smollm2_tokenizer) == 2 == smollm2_tokenizer.eos_token_id
    assert smollm2_tokenizer.convert_ids_to_tokens(2) == IM_END
    assert stop_token_ids(smollm2_tokenizer) == [2]
    assert smollm2_tokenizer.pad_token is not None


@pytest.mark.parametrize("tokenizer_name", THREE_TOKENIZERS)
def test_completion_continues_the_prompt_exactly(request, tokenizer_name, synthetic_test_samples):
    """With each tokenizer the prompt for generation is token for token the prefix of the trained
    sequence, it is the plain encoding of the prompt text and decodes back to it, and the completion decodes to the think block +
    action + the end-of-turn token."""
    import dataclasses

    from data.chat_text import prompt_text

    tokenizer = request.getfixturevalue(tokenizer_name)
    end = end_of_turn_id(tokenizer)
    chosen = synthetic_test_samples[::40]
    assert {sample.target["kind"] for sample in chosen} == {"tool_call", "answer"}
    for index, sample in enumerate(chosen):
        if index % 2:  # half of them with written reasoning in the think block
            sample = dataclasses.replace(sample, reasoning=f"Step {index}: check the policy first.")
        where = f"{tokenizer_name}: {sample.conversation_id} turn {sample.turn_index}"
        completion = completion_ids(sample, tokenizer)
        rendered = render(sample, tokenizer)
        prompt = render_prompt(sample, tokenizer, completion_budget=len(completion))
        assert rendered.input_ids[: rendered.prompt_length] == prompt.input_ids, where
        assert rendered.input_ids[rendered.prompt_length:] == completion, where
        assert rendered.loss_mask == [0] * rendered.prompt_length + [1] * len(completion), where
        assert completion[-1] == end, where
        assert tokenizer.decode(completion) == format_completion(sample.target, sample.reasoning) + tokenizer.decode([end]), where
        text = prompt_text(tokenizer, sample.system, sample.tools, sample.context)
        assert prompt.input_ids == tokenizer.encode(text, add_special_tokens=False), where  # block cache is exact
        assert tokenizer.decode(prompt.input_ids) == text, where
    if tokenizer_name == "smollm2_tokenizer":
        assert tokenizer.decode([end]) == IM_END and end == 2
