"""Tiny offline models for tests, benchmarks and examples.

``make_tiny_model(path)`` writes a random Llama-shaped causal LM (a few hundred thousand parameters) and a
byte-level BPE tokenizer trained on a small built-in corpus, with a ChatML chat template like SmolLM2's.
Everything is built locally: nothing is downloaded, so tests run offline and in seconds.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

_CORPUS = [
    "Tom has 3 apples. He buys 4 more. How many apples does he have?",
    "Start with 3. Add 4: 3 + 4 = 7.",
    "The answer is 7.",
    "Multiply 6 by 5: 6 * 5 = 30. Subtract 2: 30 - 2 = 28.",
    "Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, then bake it.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) , . ? !",
    "system user assistant Step step answer total each more less times left right",
]


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens (pad distinct from EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    task: str = "causal-lm",
) -> Path:
    """Write a random tiny Llama (``task``: causal-lm, seq-cls or token-cls) and its tokenizer to ``path``."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        LlamaConfig,
    )

    path = Path(path)
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        num_labels=1 if task == "seq-cls" else 2,
    )
    torch.manual_seed(seed)
    model_class = {
        "causal-lm": AutoModelForCausalLM,
        "seq-cls": AutoModelForSequenceClassification,
        "token-cls": AutoModelForTokenClassification,
    }[task]
    model = model_class.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def stage_context(recipe, stage_name: str, *, rank: int = 0, world: int = 1):
    """A real :class:`~alignkit.core.stage.StageContext` for calling a stage's ``run`` directly, as rank
    ``rank`` of ``world`` processes (no tracking; barriers are no-ops: tests run the ranks one after another)."""
    from types import SimpleNamespace

    from alignkit.core.stage import StageContext
    from alignkit.core.tracking import Tracker

    stage = recipe.stage(stage_name)
    tracker = Tracker(recipe.tracking, group=recipe.name, job_type=stage.kind, name=stage.name, config={},
                      directory=stage.run_dir, enabled=False)
    state = SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                            wait_for_everyone=lambda: None, device="cpu")
    return StageContext(recipe=recipe, stage=stage, tracker=tracker, is_main=rank == 0, state=state)
