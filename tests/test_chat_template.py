"""A GGUF's own chat template: read from the file's metadata (checked against gguf-py's writer), rendered in a
sandbox as transformers renders it, and used by the server's chat prompts; a template that fails is a 400."""

from __future__ import annotations

import pytest

from csdrafting.chat_template import ChatTemplate, ChatTemplateError, gguf_chat_template, read_gguf_chat_template
from csdrafting.server.protocol import ApiError, chat_prompt_ids, chat_prompt_text

gguf = pytest.importorskip("gguf", reason="gguf-py not installed: pip install -e '.[llama]'")

# Qwen2.5's template, cut to the parts that shape a plain conversation (the real one also renders tools)
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role != 'system' or not loop.first %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
STRICT = (
    "{% if messages[0].role != 'user' %}{{ raise_exception('the first message must be from the user') }}{% endif %}"
)
USER_HI = [{"role": "user", "content": "hi"}]


def write_gguf(path, template: str | None, tokens=("<s>", "</s>", "a", "b")) -> str:
    """A metadata-only GGUF (no tensors) with a vocabulary, BOS/EOS ids and optionally a chat template."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(list(tokens))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_uint32("test.after_tokens", 7)  # keys after the arrays must still be found
    if template is not None:
        writer.add_chat_template(template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


class GgufTokenizer:
    """What the server sees of a llama.cpp tokenizer: a GGUF path, no HF chat template, byte ids."""

    chat_template = None

    def __init__(self, path) -> None:
        self.path = path
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append((text, add_special_tokens))
        return {"input_ids": list(text.encode())}


def test_reads_the_template_and_special_tokens_from_gguf_metadata(tmp_path):
    template = read_gguf_chat_template(write_gguf(tmp_path / "m.gguf", CHATML + "{{ bos_token }}{{ eos_token }}"))
    assert template.source.startswith("{%- if messages[0]")
    assert (template.bos_token, template.eos_token) == ("<s>", "</s>")
    assert template.render(USER_HI).endswith("<|im_start|>assistant\n<s></s>")
    assert read_gguf_chat_template(write_gguf(tmp_path / "plain.gguf", None)) is None


def test_renders_chatml_with_trimmed_blocks():
    template = ChatTemplate(CHATML)
    assert template.render(USER_HI) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    conversation.append({"role": "assistant", "content": "a"})
    assert template.render(conversation, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    )
    # trim_blocks / lstrip_blocks: a block tag's own line leaves no newline or indentation behind
    assert ChatTemplate("{% for m in messages %}\n    {{ m.content }}\n{% endfor %}").render(USER_HI) == "    hi\n"
    assert ChatTemplate("{{ messages | tojson }}").render([{"role": "user", "content": "é"}]) == (
        '[{"role": "user", "content": "é"}]'
    )


@pytest.mark.parametrize(
    "source, message",
    [
        (STRICT, "the first message must be from the user"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),  # the sandbox: no Python internals
        ("{{ messages.append(1) }}", "unsafe"),  # immutable: a template cannot change the conversation
        ("{% for m in messages %}", "does not compile"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
    ],
)
def test_a_template_that_fails_raises_chat_template_error(source, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(source).render([{"role": "system", "content": "x"}])


def test_server_renders_a_gguf_template_and_adds_no_special_tokens(tmp_path):
    tokenizer = GgufTokenizer(write_gguf(tmp_path / "m.gguf", CHATML))
    cascade = type("FakeCascade", (), {"tokenizer": tokenizer})()
    text = chat_prompt_text(tokenizer, USER_HI)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert chat_prompt_ids(cascade, USER_HI) == list(text.encode())
    assert tokenizer.calls == [(text, False)]  # the template wrote its own special tokens


def test_a_gguf_template_that_fails_is_a_400(tmp_path):
    tokenizer = GgufTokenizer(write_gguf(tmp_path / "m.gguf", STRICT))
    cascade = type("FakeCascade", (), {"tokenizer": tokenizer})()
    with pytest.raises(ApiError, match="first message must be from the user") as rejected:
        chat_prompt_ids(cascade, [{"role": "system", "content": "x"}])
    assert rejected.value.status == 400 and rejected.value.param == "messages"


def test_a_gguf_without_a_template_keeps_the_plain_text_format(tmp_path):
    tokenizer = GgufTokenizer(write_gguf(tmp_path / "m.gguf", None))
    assert gguf_chat_template(tokenizer) is None
    assert chat_prompt_text(tokenizer, USER_HI) == "user: hi\nassistant:"
