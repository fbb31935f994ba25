"""Credentials never reach what we write."""

from alignkit.core.secrets import MASK, redact, redact_text

HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWx"
WANDB = "0123456789abcdef" * 2 + "01234567"  # 40 hex characters, the shape of a W&B API key


def test_secret_keys_are_masked_but_lookalike_keys_are_not():
    config = {"hub": {"token": "anything", "repo_id": "me/x"}, "api_key": "k", "max_new_tokens": 64,
              "pad_token": "<pad>", "generation": {"openai_api_key": "s3cret", "api_key_env": "OPENAI_API_KEY"}}
    out = redact(config)
    assert out["hub"]["token"] == MASK and out["api_key"] == MASK
    assert out["generation"]["openai_api_key"] == MASK
    assert out["hub"]["repo_id"] == "me/x" and out["max_new_tokens"] == 64 and out["pad_token"] == "<pad>"
    assert out["generation"]["api_key_env"] == "OPENAI_API_KEY"  # the variable's name is not a secret


def test_token_shapes_are_masked_anywhere_in_text():
    text = f"push with {HF} and wandb key {WANDB}; sk-{'x' * 24} too"
    out = redact_text(text)
    assert HF not in out and WANDB not in out and "sk-xxxx" not in out
    assert out.count(MASK) == 3 and out.startswith("push with ")


def test_secret_environment_values_are_masked_whatever_their_shape(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "plain-looking-value-42")
    assert redact({"note": "key=plain-looking-value-42"}) == {"note": f"key={MASK}"}
    assert redact(["a", ("plain-looking-value-42",)]) == ["a", (MASK,)]
