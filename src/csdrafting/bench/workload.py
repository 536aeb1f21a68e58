"""A prompt record of a workload (``benchmarks/workloads/*.jsonl``) as the bench sends it.

Completion records are raw text. Edit and chat records carry ``messages``, rendered with the target's own chat
template (a GGUF's ``tokenizer.chat_template``, or an HF tokenizer's), the generation prompt added, so an
instruct model gets the prompt it was trained on; a model without a template gets the record's plain ``text``.
A record's ``max_new_tokens`` and ``ignore_eos`` replace the suite's length and the mode's stop rule.
"""

from __future__ import annotations

from ..chat_template import gguf_chat_template
from ..errors import ConfigError


def prompt_text(prompt: dict, tokenizer) -> tuple[str, bool]:
    """(the text to tokenize, whether the tokenizer should add its special tokens): a record's
    ``messages`` through the target's chat template, else its ``text``."""
    messages = prompt.get("messages")
    if not messages:
        return prompt["text"], True
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ConfigError(f"prompt {prompt['id']}: 'messages' must be a list of {{role, content}} objects")
    template = gguf_chat_template(tokenizer)
    if template is not None:
        text = template.render(messages, add_generation_prompt=True)
        # a template that writes the BOS itself must not get a second one from the tokenizer
        return text, not (template.bos_token and text.startswith(template.bos_token))
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    return prompt["text"], True


def encode_prompt(prompt: dict, tokenizer) -> list[int]:
    text, add_special_tokens = prompt_text(prompt, tokenizer)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def record_max_new_tokens(prompt: dict, default: int) -> int:
    """The record's ``max_new_tokens`` when it gives one, else the suite's length."""
    value = prompt.get("max_new_tokens", default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"prompt {prompt['id']}: max_new_tokens must be a positive integer, got {value!r}")
    return value


def record_fixed_length(prompt: dict, default: bool) -> bool:
    """Whether EOS is ignored: the record's ``ignore_eos`` when it gives one, else the mode's."""
    value = prompt.get("ignore_eos", default)
    if not isinstance(value, bool):
        raise ConfigError(f"prompt {prompt['id']}: ignore_eos must be true or false, got {value!r}")
    return value
