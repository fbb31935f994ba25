"""``alignkit init DIR``: a starter project that runs as it is.

Writes ``DIR/recipe.yaml`` (SFT on a local data file, then a few GRPO steps rewarded by the project's own
reward program, on the default model, CPU-sized), ``DIR/reward/my_reward.py`` (a reward program template in
TRL's convention), ``DIR/data/train.jsonl`` (example rows: prompt, completion, answer) and a README.md.
Refuses a DIR that exists and is not empty.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignkit.core.errors import AlignkitError

RECIPE = """\
# {name}: a starter recipe written by `alignkit init`. From this folder:
#   alignkit run recipe.yaml --dry-run    # the resolved plan: stages, model, data, outputs
#   alignkit run recipe.yaml              # SFT, then GRPO rewarded by reward/my_reward.py (CPU: a few minutes)
#   alignkit grade data/train.jsonl --reward reward/my_reward.py:my_reward
# Outputs go to runs/{name}/<stage>/; a rerun skips finished stages. Scale up from here: your own rows in
# data/train.jsonl, more steps (max_steps, or epochs), a bigger model, `quantization: {{bits: 4}}` on a GPU.
name: {name}
description: starter project - SFT on data/train.jsonl, then GRPO rewarded by reward/my_reward.py
defaults:
  model: smollm2-135m-instruct          # a Hub id, a local folder, or a built-in alias
  lora: {{r: 8, alpha: 16, dropout: 0.0}}
tracking: {{report_to: none}}           # or {{report_to: wandb, wandb: {{project: {name}, mode: offline}}}}
stages:
  - kind: sft                           # supervised fine-tuning on prompt -> completion
    data: data/train.jsonl              # uses the prompt and completion columns
    max_steps: 8
    batch_size: 4
    lr: 1.0e-3                          # LoRA on a small model tolerates a high rate
    max_length: 256
  - kind: grpo                          # RL: sample num_generations completions per prompt, score, update
    model: ${{sft.model}}                 # the SFT stage's output
    data: data/train.jsonl              # uses prompt; every other column (answer) reaches the reward
    rewards: [{{program: reward/my_reward.py:my_reward}}]
    num_generations: 4
    batch_size: 4                       # completions per step: 1 prompt x 4 samples
    max_completion_length: 64
    max_steps: 3
    lr: 1.0e-4
"""

REWARD = '''\
"""my_reward: a reward program (a template: edit it, or add more functions beside it).

A reward program is a plain function in TRL's reward convention::

    fn(completions, **columns) -> list[float | None]

- ``completions``: the completions to score, strings (or chat message lists; ``completion_text`` reads both);
- ``columns``: every other column of the data, as keyword lists of the same length (here ``answer``); take
  the ones you need by name and let ``**kwargs`` swallow the rest (TRL also passes ``prompts`` and more);
- return one score per completion: a finite number, or None to leave that sample out.

Where it is used: recipe.yaml's grpo stage (``rewards: [{program: reward/my_reward.py:my_reward}]``),
``alignkit grade data/train.jsonl --reward reward/my_reward.py:my_reward`` (scores a jsonl of completions),
an eval suite's ``grader:``, and ``GRPOTrainer(reward_funcs=[my_reward])`` unchanged.
alignkit's own verifier is ``reward/math.py:answer_match`` (shipped with alignkit: usable by that name).

>>> my_reward(["2 + 2 = 4.\\\\nThe answer is 4.", "The answer is 5.", "four"], answer=["4", "4", "4"])
[1.0, 0.0, 0.0]
"""

from __future__ import annotations

import re

from alignkit.rewards.values import completion_text

FINAL_ANSWER = re.compile(r"The answer is (-?[0-9][0-9,]*(?:\\\\.[0-9]+)?)")


def my_reward(completions: list, answer: list, **kwargs) -> list[float | None]:
    """1.0 when the last "The answer is N" states the gold answer, else 0.0."""
    scores: list[float | None] = []
    for completion, gold in zip(completions, answer):
        stated = FINAL_ANSWER.findall(completion_text(completion))
        if not stated:
            scores.append(0.0)
            continue
        scores.append(1.0 if stated[-1].replace(",", "") == str(gold).replace(",", "").strip() else 0.0)
    return scores
'''

ROWS = [
    ("Mia has 4 apples. She buys 3 more. How many apples does Mia have now?",
     "Add 3: 4 + 3 = 7.", "7"),
    ("Leo has 12 marbles. He gives away 5. How many marbles does Leo have left?",
     "Subtract 5: 12 - 5 = 7.", "7"),
    ("A box holds 6 eggs. How many eggs are in 3 boxes?",
     "Multiply: 6 * 3 = 18.", "18"),
    ("Ana reads 9 pages a day. How many pages does she read in 4 days?",
     "Multiply: 9 * 4 = 36.", "36"),
    ("Sam has 20 stickers and shares them equally with 4 friends. How many does each friend get?",
     "Divide: 20 / 4 = 5.", "5"),
    ("Ivy has 8 books. She buys 5 more, then gives away 2. How many books does Ivy have now?",
     "Add 5: 8 + 5 = 13.\nSubtract 2: 13 - 2 = 11.", "11"),
    ("Omar has 7 coins. He doubles them, then spends 4. How many coins does Omar have now?",
     "Multiply by 2: 7 * 2 = 14.\nSubtract 4: 14 - 4 = 10.", "10"),
    ("A class has 15 pupils. 6 more join, then 3 leave. How many pupils are in the class now?",
     "Add 6: 15 + 6 = 21.\nSubtract 3: 21 - 3 = 18.", "18"),
]

README = """\
# {name}

A starter alignkit project (written by `alignkit init`).

| file | what |
|---|---|
| `recipe.yaml` | the stages: SFT on `data/train.jsonl`, then a few GRPO steps rewarded by `reward/my_reward.py` |
| `data/train.jsonl` | example rows, one JSON per line: `prompt`, `completion` (SFT), `answer` (the reward) |
| `reward/my_reward.py` | a reward program template: `fn(completions, **columns) -> list[float or None]` |

```bash
alignkit run recipe.yaml --dry-run                                # the plan: stages, model, data, outputs
alignkit run recipe.yaml                                          # run it (CPU is fine); outputs in runs/{name}/
alignkit grade data/train.jsonl --reward reward/my_reward.py:my_reward   # score completions with the reward
alignkit recipes                                                  # the recipes shipped with alignkit
```

Columns named differently in your own data? Map them in the recipe:
`data: {{source: my.jsonl, columns: {{prompt: question, completion: solution}}}}`.
Shipped reward programs (`reward/math.py:answer_match`, `reward/format.py:step_format`), recipes
(`alignkit run quickstart`) and eval suites (`alignkit eval gsm8k ...`) work by name from any folder;
a file of the same name under this folder wins.
"""


def project_name(directory: Path) -> str:
    """A recipe name from the folder name: letters, digits, '_', '-', '.' only."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", directory.resolve().name).strip("-.")
    return name or "my-project"


def write_starter(directory: str | Path) -> list[Path]:
    """Write the starter project into ``directory`` (created; refused when it exists and is not empty)."""
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise AlignkitError(f"{directory} exists and is not empty; give a new or empty folder")
    name = project_name(directory)
    rows = "".join(json.dumps({"prompt": p, "completion": f"{c}\nThe answer is {a}.", "answer": a}) + "\n"
                   for p, c, a in ROWS)
    files = {"recipe.yaml": RECIPE.format(name=name), "reward/my_reward.py": REWARD,
             "data/train.jsonl": rows, "README.md": README.format(name=name)}
    written = []
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
