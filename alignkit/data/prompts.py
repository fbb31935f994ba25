"""Turning dataset prompts into model input text, the same way in training, sampling and evaluation."""

from __future__ import annotations

from typing import Any


def as_messages(prompt: str | list[dict[str, str]], system: str | None = None) -> list[dict[str, str]]:
    """A prompt as chat messages: a plain string becomes one user turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return messages


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], *, chat: bool = True,
                  system: str | None = None) -> str:
    """Text to feed the model: the chat template with the assistant turn opened, or the raw prompt.

    Models without a chat template get the raw prompt followed by a newline.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(as_messages(prompt, system), tokenize=False,
                                             add_generation_prompt=True)
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return text + "\n"
