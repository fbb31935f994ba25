"""The tiny stages of the fault-injection suite (tests/test_fault_injection.py): one per resumable stage kind
(two for dpo: a preference file and on-policy pairs), each the smallest run that still crosses a resume point
(a checkpoint, a data shard) more than once.

``STAGES[name](folder, model)`` writes the stage's side files (data, reward programs, an eval suite) into
``folder`` and returns its recipe block; :func:`recipe` puts blocks together into one recipe.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

# Reward programs read by the RL stages: pure functions of the text, so a rerun scores as the first run did.
REWARDS_PY = '''
from alignkit.rewards.values import completion_text


def digit_fraction(completions, **kwargs):
    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / len(t) if t else 0.0 for t in texts]


def even_length(completions, **kwargs):
    return [float(len(completion_text(c)) % 2 == 0) for c in completions]
'''

# DPO and reward-model pairs (a marker word the tiny model can learn to prefer).
PAIRS = [{"prompt": f"Tom has {i} apples. He buys {i + 2} more. How many?",
          "chosen": f"The answer is {2 * i + 2}.", "rejected": "The quick brown fox."} for i in range(16)]

# An eval suite: 6 problems, 2 samples and a greedy decode each, 3 shards of 2 problems.
SUITE = """\
name: tiny
dataset: {source: arith, seed: 3, params: {n: 6, steps: 1, max_operand: 9}}
sampling: {n: 2, max_completion_length: 6}
generation: {backend: fast, batch_size: 8}
shard_size: 2
"""

LORA = "{r: 8, alpha: 16, dropout: 0.0}"


def _write(folder: Path, name: str, stage: str, files: dict[str, str] | None = None) -> str:
    """Write the side ``files`` into ``folder``; return the stage block, named ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in (files or {}).items():
        (folder / file).write_text(text)
    kind_line, rest = textwrap.dedent(stage).split("\n", 1)
    return f"{kind_line}\n  name: {name}\n{rest}"


def _pairs_file() -> str:
    return "".join(json.dumps(row) + "\n" for row in PAIRS)


def sft(folder: Path, model: Path) -> str:
    """12 steps, a checkpoint every 4."""
    return _write(folder, "sft", f"""\
        - kind: sft
          model: {model}
          lora: {LORA}
          data: {{source: arith, params: {{n: 64, steps: 1, max_operand: 9}}}}
          lr: 5.0e-3
          max_steps: 12
          batch_size: 8
          max_length: 128
          logging_steps: 2
          save_steps: 4
        """)


def label(folder: Path, model: Path) -> str:
    """3 shards of 2 problems."""
    return _write(folder, "label", f"""\
        - kind: label
          model: {model}
          data: {{source: arith, params: {{n: 6, steps: 1, max_operand: 9}}}}
          num_generations: 2
          completions_per_step: 2
          agreement_ns: [1, 2]
          max_completion_length: 16
          max_continuation_length: 8
          shard_size: 2
          generation: {{backend: hf, batch_size: 8}}
        """)


def rejection(folder: Path, model: Path) -> str:
    """3 shards of 2 prompts, 4 attempts each, one revision round."""
    return _write(folder, "rejection", f"""\
        - kind: rejection
          model: {model}
          data: {{source: arith, params: {{n: 6, steps: 1, max_operand: 9}}}}
          rewards: [{{program: "rewards.py:even_length"}}]
          num_generations: 4
          keep: 2
          revise_rounds: 1
          max_completion_length: 8
          shard_size: 2
          generation: {{backend: hf, batch_size: 8}}
        """, {"rewards.py": REWARDS_PY})


def dpo(folder: Path, model: Path) -> str:
    """Offline preference file: 16 pairs, batch 4, 6 steps (into a second epoch), a checkpoint every 2."""
    return _write(folder, "dpo", f"""\
        - kind: dpo
          model: {model}
          data: {{source: {folder / 'pairs.jsonl'}}}
          lora: {LORA}
          lr: 5.0e-3
          beta: 0.1
          max_steps: 6
          batch_size: 4
          max_length: 64
          logging_steps: 1
          save_steps: 2
        """, {"pairs.jsonl": _pairs_file()})


def dpo_pairs(folder: Path, model: Path) -> str:
    """On-policy pairs: 12 prompts x 4 samples in 3 shards of 4 prompts, then 4 DPO steps, a checkpoint every 2."""
    return _write(folder, "dpo-pairs", f"""\
        - kind: dpo
          model: {model}
          lora: {LORA}
          lr: 5.0e-3
          max_steps: 4
          batch_size: 2
          max_length: 96
          logging_steps: 1
          save_steps: 2
          pairs:
            prompts: {{source: arith, params: {{n: 12, steps: 1}}}}
            num_generations: 4
            rewards: [{{program: "rewards.py:even_length"}}]
            max_completion_length: 12
            shard_size: 4
            generation: {{backend: fast, batch_size: 16}}
        """, {"rewards.py": REWARDS_PY})


def reward(folder: Path, model: Path) -> str:
    """Outcome reward model: 12 train pairs (4 held out), batch 4, 6 steps, a checkpoint every 2."""
    return _write(folder, "reward", f"""\
        - kind: reward
          model: {model}
          data: {{source: {folder / 'pairs.jsonl'}}}
          eval_size: 4
          lora: {LORA}
          lr: 3.0e-3
          max_steps: 6
          batch_size: 4
          max_length: 48
          logging_steps: 1
          save_steps: 2
        """, {"pairs.jsonl": _pairs_file()})


def prm(folder: Path, model: Path) -> str:
    """Process reward model (token-classification head, full fine-tuning): 8 rows, batch 4, 6 steps, a
    checkpoint every 2."""
    return _write(folder, "prm", f"""\
        - kind: prm
          model: {model}
          data: {{source: arith, params: {{n: 8, steps: 2, max_operand: 9}}}}
          lr: 3.0e-3
          max_steps: 6
          batch_size: 4
          logging_steps: 1
          save_steps: 2
          max_length: 160
        """)


def grpo(folder: Path, model: Path) -> str:
    """GRPO: 2 prompts x 4 samples a step, 6 steps, a checkpoint every 2."""
    return _write(folder, "grpo", f"""\
        - kind: grpo
          model: {model}
          lora: {LORA}
          data: {{source: arith, params: {{n: 16, steps: 1, max_operand: 9}}}}
          rewards: [{{program: "rewards.py:digit_fraction"}}]
          num_generations: 4
          batch_size: 8
          max_completion_length: 8
          lr: 3.0e-2
          max_steps: 6
          logging_steps: 1
          save_steps: 2
        """, {"rewards.py": REWARDS_PY})


def rloo(folder: Path, model: Path) -> str:
    """RLOO: 2 prompts x 4 samples a step, 6 steps, a checkpoint every 2."""
    return _write(folder, "rloo", f"""\
        - kind: rloo
          model: {model}
          lora: {LORA}
          data: {{source: arith, params: {{n: 16, steps: 1, max_operand: 9}}}}
          rewards: [{{program: "rewards.py:digit_fraction"}}]
          num_generations: 4
          batch_size: 8
          max_completion_length: 8
          beta: 0.0
          lr: 3.0e-2
          max_steps: 6
          logging_steps: 1
          save_steps: 2
        """, {"rewards.py": REWARDS_PY})


def ppo(folder: Path, model: Path) -> str:
    """alignkit's PPO loop: 4 samples a step, 2 epochs, adaptive KL, 6 steps, a checkpoint every 2."""
    return _write(folder, "ppo", f"""\
        - kind: ppo
          model: {model}
          lora: {LORA}
          data: {{source: arith, params: {{n: 32, steps: 1, max_operand: 9}}}}
          rewards: [{{program: "rewards.py:digit_fraction"}}]
          adaptive_kl: {{target: 0.5, horizon: 100}}
          batch_size: 4
          ppo_epochs: 2
          max_completion_length: 8
          max_length: 128
          lr: 1.0e-2
          max_steps: 6
          logging_steps: 1
          save_steps: 2
        """, {"rewards.py": REWARDS_PY})


def rntp(folder: Path, model: Path) -> str:
    """Reasoning next-token prediction: position shards, 4 GRPO steps, a checkpoint every 2, bucketed eval.
    The dense reward (log-prob gain of the true token): the 0/1 match reward is 0 for every sample of a random
    tiny model, so its advantages, gradients and updates would all be zero and any resume would look exact."""
    return _write(folder, "rntp", f"""\
        - kind: rntp
          model: {model}
          data: {{source: arith, seed: 3, params: {{n: 6, steps: 1, max_operand: 9}}}}
          eval_data: {{source: arith, seed: 9, params: {{n: 4, steps: 1, max_operand: 9}}}}
          min_entropy: 0.0
          reward: dense
          prefilter_samples: 0
          shard_size: 4
          num_generations: 4
          batch_size: 8
          max_completion_length: 8
          max_steps: 4
          logging_steps: 1
          save_steps: 2
        """)


def eval_(folder: Path, model: Path) -> str:
    """An eval suite: 3 sample shards of 2 problems."""
    return _write(folder, "eval", f"""\
        - kind: eval
          suite: tiny.yaml
          model: {model}
        """, {"tiny.yaml": SUITE})


def cai_label(folder: Path, model: Path) -> str:
    """RLAIF labels, the policy judging itself: 6 conversation prompts in 3 shards of 2."""
    rows = [{"prompt": [{"role": "user", "content": f"How many apples are {k} and {k + 1}?"}]} for k in range(6)]
    return _write(folder, "cai-label", f"""\
        - kind: cai-label
          model: {model}
          data: {{source: {folder / 'prompts.jsonl'}}}
          threshold: 0.5
          max_completion_length: 8
          shard_size: 2
          judge: {{batch_size: 4}}
        """, {"prompts.jsonl": "".join(json.dumps(r) + "\n" for r in rows)})


def cai_revise(folder: Path, model: Path) -> str:
    """Critique/revision: 6 red-team prompts in 3 shards of 2, one round."""
    return _write(folder, "cai-revise", f"""\
        - kind: cai-revise
          model: {model}
          data: {{source: redteam, limit: 6}}
          shard_size: 2
          max_completion_length: 12
          max_critique_length: 6
          max_revision_length: 12
          generation: {{backend: fast, batch_size: 8}}
        """)


STAGES = {"sft": sft, "label": label, "rejection": rejection, "dpo": dpo, "dpo-pairs": dpo_pairs, "reward": reward, "prm": prm,
          "grpo": grpo, "rloo": rloo, "ppo": ppo, "rntp": rntp, "eval": eval_, "cai-label": cai_label,
          "cai-revise": cai_revise}


def recipe(folder: Path, model: Path, names: list[str]) -> Path:
    """``folder/fault.yaml``: recipe ``fault`` with the stages ``names`` (each named as in :data:`STAGES`, so a
    stage's run folder is ``<output-dir>/fault/<name>`` in any recipe of them)."""
    blocks = [STAGES[name](folder, model) for name in names]
    path = folder / "fault.yaml"
    path.write_text("name: fault\ntracking: {report_to: none}\nstages:\n"
                    + "".join(textwrap.indent(block, "  ") for block in blocks))
    return path
