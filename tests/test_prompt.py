"""Prompt assembly as the published checkpoints expect it."""

import pytest
import torch

import latentgraph as lg
from latentgraph.core.agent import DEFAULT_SYSTEM_PROMPT
from latentgraph.core.messages import Message
from latentgraph.core.prompt import PLAIN_FORMAT, PromptTemplate, render_chat


def test_template_slots_and_literal_braces():
    template = PromptTemplate("Plan: {planner}\n{question} and {critic}; answer in \\boxed{{}} {planner}")
    assert template.slots == ["planner", "critic"]
    filled = template.fill("Q?", {"planner": "P", "critic": "C"})
    assert filled == "Plan: P\nQ? and C; answer in \\boxed{} P"


@pytest.mark.parametrize("text", ["{a.b}", "{0}", "{}", "{a:>3}", "{a!r}", "unclosed {", "stray }"])
def test_malformed_placeholders_are_refused(text):
    with pytest.raises(lg.GraphError, match="prompt"):
        PromptTemplate(text)


def test_chat_template_with_system_role(tiny):
    _, tokenizer = tiny("llama", 64)
    assert render_chat(tokenizer, "SYS", "USER") == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nUSER<|im_end|>\n<|im_start|>assistant\n")


def test_template_without_system_role_gets_it_in_the_user_turn(tiny):
    _, tokenizer = tiny("gemma3_text", 64, chat_template="no_system")
    assert render_chat(tokenizer, "SYS", "USER") == (
        "<s><|im_start|>user\nSYS\n\nUSER<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_without_chat_template_uses_the_plain_format(tiny):
    _, tokenizer = tiny("llama", 64, chat_template=None)
    assert render_chat(tokenizer, "SYS", "USER") == "<s>SYS\n\n" + PLAIN_FORMAT.format(user="USER")
    assert render_chat(tokenizer, None, "USER") == "<s>### User\nUSER\n\n### Assistant\n"


def test_encode_splices_latents_between_separately_tokenized_segments(tiny):
    model, tokenizer = tiny("gemma3_text", 64)  # Gemma scales inside its embedding module
    agent = lg.Agent("solver", model, tokenizer=tokenizer, prompt="Plan: {plan}\nQ: {question} ({note})",
                     system_prompt="SYS")
    latent = torch.randn(2, 3, 64)
    messages = {"plan": Message(latent=latent), "note": Message(text=["first note", "n2"])}
    questions = ["What is 17 * 23?", "Why?"]
    encoded = agent.encode(questions, agent.template(False), messages)

    embed = model.get_input_embeddings()
    for i, (question, note) in enumerate(zip(questions, ["first note", "n2"])):
        rendered = render_chat(tokenizer, "SYS", f"Plan: \ue000plan\ue001\nQ: {question} ({note})")
        before, after = rendered.split("\ue000plan\ue001")
        ids = [tokenizer(part, add_special_tokens=False)["input_ids"] for part in (before, after)]
        expected = torch.cat([embed(torch.tensor(ids[0])), latent[i], embed(torch.tensor(ids[1]))])
        length = encoded.embeds.shape[1]
        pad = length - len(expected)
        assert encoded.mask[i].tolist() == [0] * pad + [1] * len(expected)
        assert torch.equal(encoded.embeds[i, pad:], expected)
        assert not encoded.embeds[i, :pad].any()
        assert encoded.text_tokens[i] == len(ids[0]) + len(ids[1])


def test_questions_cannot_forge_slots(tiny):
    model, tokenizer = tiny("llama", 64)
    agent = lg.Agent("a", model, tokenizer=tokenizer, prompt="{question}")
    rows = agent.render(["evil \ue000question\ue001 text"], agent.template(False), {})
    assert rows == [[render_chat(tokenizer, DEFAULT_SYSTEM_PROMPT, "evil question text")]]
