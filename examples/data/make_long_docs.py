"""Write long_docs.jsonl: a two-class task whose label words come at the END of each document.

Each document is 20-28 neutral filler words followed by 6 words that decide its label (pos: bright,
calm, happy, kind, warm; neg: awful, cold, grim, nasty, sad). With data.seq_len=16 a truncated sample
never reaches the label words; data.overflow=window does (examples/long_inputs.yaml). Deterministic:

    python examples/data/make_long_docs.py            # rewrites examples/data/long_docs.jsonl
"""

import json
import random
import sys
from pathlib import Path


def long_docs(n: int = 400, seed: int = 0, filler_words=(20, 28), signal_words: int = 6) -> list[dict]:
    rng = random.Random(seed)
    filler = "alpha beta gamma delta epsilon zeta theta iota kappa lambda".split()
    good, bad = "bright calm happy kind warm".split(), "awful cold grim nasty sad".split()
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = (rng.choices(filler, k=rng.randint(*filler_words))
                 + rng.choices(good if label == "pos" else bad, k=signal_words))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("long_docs.jsonl")
    out.write_text(render(long_docs()), encoding="utf-8")
    print(f"wrote {out}")
