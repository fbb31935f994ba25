"""Keep credentials out of everything we write: manifests, model cards, saved recipes, logs.

Two rules: a mapping key that names a credential (``token``, ``api_key``, ``password``, ...) has its value
replaced, and any string that *looks* like a credential (Hugging Face, W&B, OpenAI, GitHub token shapes,
or the current value of a secret environment variable) is masked wherever it appears.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
# Exact key names (not substrings: `max_new_tokens` and `pad_token` are not secrets).
SECRET_KEY = re.compile(
    r"^(.*_)?(token|hf_token|hub_token|access_token|auth_token|api_key|apikey|secret|password|passwd)$",
    re.IGNORECASE,
)
TOKENIZER_KEYS = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY")
SECRET_SHAPES = re.compile(
    r"(hf_[A-Za-z0-9]{20,}"  # Hugging Face user access token
    r"|sk-[A-Za-z0-9_\-]{20,}"  # OpenAI-style keys
    r"|gh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])"  # W&B API keys are 40 hex characters
    r"|(?<![A-Za-z0-9])(wandb_v1_|local-)[A-Za-z0-9_]{20,})"
)


def _env_secrets() -> list[str]:
    values = [os.environ.get(name, "") for name in SECRET_ENV]
    return [value for value in values if len(value) >= 8]


def redact_text(text: str) -> str:
    """Mask every credential-shaped substring and every secret environment variable's value."""
    for value in _env_secrets():
        text = text.replace(value, MASK)
    return SECRET_SHAPES.sub(MASK, text)


def _is_secret_field(key: Any, value: Any) -> bool:
    return (
        isinstance(key, str)
        and key.lower() not in TOKENIZER_KEYS
        and SECRET_KEY.match(key) is not None
        and isinstance(value, str)
        and value != ""
    )


def redact(obj: Any) -> Any:
    """Return a copy of ``obj`` (nested dicts/lists/strings) with credentials masked."""
    if isinstance(obj, dict):
        return {key: MASK if _is_secret_field(key, value) else redact(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(item) for item in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with credentials masked: token shapes anywhere, and the value of ``--set KEY=VALUE``
    (or ``--set=KEY=VALUE``) when the key's last part names a credential or the value is a mapping that
    holds one (``hub={repo_id: me/x, token: abc}``).

    >>> redact_argv(["alignkit", "run", "q.yaml", "--set", "hub.token=abc", "--set=trl.api_key=xyz", "lr=1"])
    ['alignkit', 'run', 'q.yaml', '--set', 'hub.token=***', '--set=trl.api_key=***', 'lr=1']
    """
    masked = []
    for arg in argv:
        head = "--set=" if arg.startswith("--set=") else ""
        key, sep, value = arg[len(head):].partition("=")
        if sep and (_is_secret_field(key.rsplit(".", 1)[-1].strip(), value) or _holds_secret(value)):
            arg = f"{head}{key}={MASK}"
        masked.append(redact_text(arg))
    return masked


def _holds_secret(value: str) -> bool:
    """Whether a YAML flow value (``{token: abc}``) has a credential-named key with a value."""
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return False
    return isinstance(parsed, (dict, list)) and redact(parsed) != parsed
