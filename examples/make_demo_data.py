"""Generate examples/demo.jsonl: small alpaca-format tasks a tiny random model can learn with LoRA.

Every task is short (under ~60 tokens with the builtin byte-level tokenizer, chat template included)
and regular at the character level, so a few hundred optimizer steps on two CPU cores visibly lower
the held-out loss. The output is committed; rerun to regenerate it identically:

    python examples/make_demo_data.py            # writes examples/demo.jsonl
    python examples/make_demo_data.py --check    # exits 1 if the committed file differs
"""

import argparse
import json
import random
import sys
from pathlib import Path

WORDS = (
    "cat dog sun map cup hat pen box fox owl bee ant egg ice jam kit log mud net oak "
    "pig rug sea toy van web yak zip bird fish frog goat lamp milk nest pear rain ship "
    "star tree wind wolf bell cake door drum leaf moon rose sand seed snow apple bread "
    "chair cloud grape horse lemon mouse plant river stone tiger"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NUMBER_WORDS = {2: "two", 3: "three"}

DEFAULT_OUT = Path(__file__).with_name("demo.jsonl")


def reverse(rng):
    w = rng.choice(WORDS)
    return {"instruction": "Reverse the word.", "input": w, "output": w[::-1]}


def uppercase(rng):
    w = rng.choice(WORDS)
    return {"instruction": "Write the word in capital letters.", "input": w, "output": w.upper()}


def add(rng):
    a, b = rng.randrange(50), rng.randrange(50)
    return {"instruction": "Add the numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def repeat(rng):
    w, n = rng.choice(WORDS), rng.choice((2, 3))
    return {"instruction": f"Repeat the word {NUMBER_WORDS[n]} times.", "input": w, "output": " ".join([w] * n)}


def next_letter(rng):
    i = rng.randrange(len(LETTERS) - 1)
    return {"instruction": "Which letter comes next?", "input": LETTERS[i], "output": LETTERS[i + 1]}


def sort_letters(rng):
    letters = rng.sample(LETTERS, 3)
    return {"instruction": "Sort the letters.", "input": " ".join(letters), "output": " ".join(sorted(letters))}


def count_letters(rng):
    w = rng.choice(WORDS)
    return {"instruction": "How many letters are in the word?", "input": w, "output": str(len(w))}


def count_up(rng):
    # No "input" field: the demo also exercises alpaca's optional input.
    a = rng.randrange(1, 10)
    b = a + rng.randrange(2, 5)
    return {"instruction": f"Count from {a} to {b}.", "output": " ".join(str(i) for i in range(a, b + 1))}


TASKS = (reverse, uppercase, add, repeat, next_letter, sort_letters, count_letters, count_up)


def make_records(n: int = 512, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [rng.choice(TASKS)(rng) for _ in range(n)]


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("-n", type=int, default=512, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args()
    text = render(make_records(args.n, args.seed))
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'differs from the generator'}")
        return 0 if same else 1
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.n} examples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
