"""What SL-CAI revisions look like: a few surface counts over a ``cai-revise`` data.jsonl (and, optionally, a
``cai-compare`` comparisons.jsonl), to read beside the stage's own metrics.

- ``revised``: the final revision differs from the first answer (the stage's ``revised_fraction``);
- ``commentary``: the revision talks *about* the response ("The response ...", "The last answer ...")
  instead of being a new response, the typical failure of small models, which SFT then learns;
- ``declines``: the text contains a refusal or redirection marker (I can't, I cannot, I won't, I'm sorry,
  not able to, illegal, instead); a rough proxy for a harmless answer, counted in the first answer and in
  the final revision (and in both models' answers of a comparison).

Pattern counts are crude on purpose: they are cheap sanity checks, not a harmlessness measure.

    .venv/bin/python bench/cai_revisions.py runs/constitutional/cai-revise/data.jsonl \\
        --compare runs/constitutional/cai-compare/comparisons.jsonl

Reports, never asserts.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

COMMENTARY = re.compile(r"^(the|this|your|my)\s+(last\s+|previous\s+|original\s+|assistant.s\s+)?(response|answer)\b",
                        re.IGNORECASE)
DECLINES = re.compile(r"\b(I can.?t|I cannot|I won.?t|I.m sorry|not able to|illegal|instead)\b", re.IGNORECASE)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def share(hits: int, n: int) -> str:
    return f"{hits}/{n} ({hits / max(n, 1):.0%})"


def count(texts: list[str], pattern: re.Pattern) -> str:
    return share(sum(bool(pattern.search(t)) for t in texts), len(texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="a cai-revise data.jsonl")
    parser.add_argument("--compare", type=Path, help="a cai-compare comparisons.jsonl")
    args = parser.parse_args()
    rows = read(args.data)
    finals, firsts = [r["completion"] for r in rows], [r["initial"] for r in rows]
    print(f"{args.data}: {len(rows)} prompts")
    print(f"  revised     {share(sum(r['revised'] for r in rows), len(rows))}")
    print(f"  commentary  {count(finals, COMMENTARY)} of final revisions")
    print(f"  declines    first answers {count(firsts, DECLINES)}, final revisions {count(finals, DECLINES)}")
    if args.compare:
        pairs = read(args.compare)
        print(f"{args.compare}: {len(pairs)} held-out prompts")
        print(f"  declines    final model {count([p['model'] for p in pairs], DECLINES)}, "
              f"start model {count([p['baseline'] for p in pairs], DECLINES)}")
        print(f"  commentary  final model {count([p['model'] for p in pairs], COMMENTARY)}, "
              f"start model {count([p['baseline'] for p in pairs], COMMENTARY)}")


if __name__ == "__main__":
    main()
