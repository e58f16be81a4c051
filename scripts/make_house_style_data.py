"""Write jqlora/data/house_style.jsonl: the small instruction set `jqlora finetune` trains on by default.

The task is a fixed answer format ("house style"): every reply is exactly two lines,

    Answer: <the short answer>
    Working: <one line that shows how>

to short questions about arithmetic, unit conversion, spelling, comparisons, calendars and
rounding. The answers are computed here, so they are right; the wording is written for this
project (no third-party text), so the file can ship under the project's licence. An instruct
model answers these in free prose, so the loss on the format is high before training and a
few minutes of LoRA fix it, visibly.

Deterministic: the same file on every run (fixed seed, no clock). Usage:
    python scripts/make_house_style_data.py [OUT.jsonl] [--n 360]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from decimal import ROUND_HALF_UP, Decimal

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WORDS = [
    "garden",
    "river",
    "window",
    "planet",
    "pencil",
    "orange",
    "bridge",
    "candle",
    "forest",
    "button",
    "ladder",
    "mirror",
    "rocket",
    "silver",
    "tunnel",
    "violin",
    "basket",
    "engine",
    "harbor",
    "island",
    "jacket",
    "kitten",
    "lemon",
    "marble",
    "needle",
    "pepper",
    "quartz",
    "saddle",
    "turtle",
    "wallet",
    "anchor",
    "blanket",
    "compass",
    "dolphin",
    "feather",
    "glacier",
    "horizon",
    "lantern",
    "meadow",
    "notebook",
    "puzzle",
    "rainbow",
    "sandwich",
    "thunder",
    "umbrella",
    "volcano",
    "whistle",
    "zebra",
    "cabbage",
    "diamond",
]
# (name of the big unit, name of the small unit, factor, short big, short small)
UNITS = [
    ("kilometres", "metres", 1000, "km", "m"),
    ("metres", "centimetres", 100, "m", "cm"),
    ("kilograms", "grams", 1000, "kg", "g"),
    ("hours", "minutes", 60, "h", "min"),
    ("minutes", "seconds", 60, "min", "s"),
    ("litres", "millilitres", 1000, "L", "mL"),
    ("days", "hours", 24, "d", "h"),
    ("weeks", "days", 7, "wk", "d"),
]


def reply(answer: str, working: str) -> str:
    return f"Answer: {answer}\nWorking: {working}"


def addition(rng):
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    q = rng.choice(
        [
            "What is {a} + {b}?",
            "Add {a} and {b}.",
            "What do you get when you add {a} to {b}?",
            "Compute {a} plus {b}.",
        ]
    ).format(a=a, b=b)
    return q, reply(str(a + b), f"{a} + {b} = {a + b}.")


def subtraction(rng):
    a, b = sorted((rng.randint(11, 99), rng.randint(11, 99)), reverse=True)
    q = rng.choice(
        [
            "What is {a} - {b}?",
            "Subtract {b} from {a}.",
            "What is {a} minus {b}?",
            "How much is left if you take {b} away from {a}?",
        ]
    ).format(a=a, b=b)
    return q, reply(str(a - b), f"{a} - {b} = {a - b}.")


def multiplication(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = rng.choice(
        [
            "What is {a} times {b}?",
            "Multiply {a} by {b}.",
            "What is {a} x {b}?",
            "What is the product of {a} and {b}?",
        ]
    ).format(a=a, b=b)
    return q, reply(str(a * b), f"{a} x {b} = {a * b}.")


def conversion(rng):
    big, small, factor, sb, ss = rng.choice(UNITS)
    n = rng.randint(2, 9)
    q = rng.choice(
        [
            "How many {small} are in {n} {big}?",
            "Convert {n} {big} to {small}.",
            "{n} {big} is how many {small}?",
        ]
    ).format(n=n, big=big, small=small)
    q = q[0].upper() + q[1:]
    return q, reply(f"{n * factor} {small}", f"{n} {sb} x {factor} {ss}/{sb} = {n * factor} {ss}.")


def letters(rng):
    w = rng.choice(WORDS)
    q = rng.choice(
        [
            'How many letters are in the word "{w}"?',
            'Count the letters in "{w}".',
            'How long is the word "{w}" in letters?',
        ]
    ).format(w=w)
    return q, reply(str(len(w)), f"{'-'.join(w)} has {len(w)} letters.")


def first_letter(rng):
    w = rng.choice(WORDS)
    q = rng.choice(
        ['What is the first letter of "{w}"?', 'Which letter does "{w}" start with?']
    ).format(w=w)
    return q, reply(w[0], f'"{w}" begins with {w[0]}.')


def larger(rng):
    a = round(rng.uniform(0.1, 0.94), rng.choice([1, 2]))
    b = round(rng.uniform(0.1, 0.94), rng.choice([1, 2]))
    if a == b:
        b = round(b + 0.05, 2)
    big, other = (a, b) if a > b else (b, a)
    q = rng.choice(
        [
            "Which is larger, {a} or {b}?",
            "Which number is bigger: {a} or {b}?",
            "Is {a} or {b} the greater number?",
        ]
    ).format(a=a, b=b)
    return q, reply(str(big), f"{big:.2f} > {other:.2f}.")


def next_day(rng):
    i, k = rng.randrange(7), rng.randint(1, 3)
    d, e = DAYS[i], DAYS[(i + k) % 7]
    if k == 1:
        q = rng.choice(["What day comes after {d}?", "Which day follows {d}?"]).format(d=d)
    else:
        q = rng.choice(
            ["What day is it {k} days after {d}?", "If today is {d}, what day is it in {k} days?"]
        ).format(d=d, k=k)
    return q, reply(e, f"{d} + {k} day{'s' if k > 1 else ''} = {e}.")


def month_after(rng):
    i, k = rng.randrange(12), rng.randint(1, 5)
    m, e = MONTHS[i], MONTHS[(i + k) % 12]
    q = rng.choice(
        ["What month comes {k} months after {m}?", "Which month is {k} months after {m}?"]
    ).format(m=m, k=k)
    if k == 1:
        q = q.replace("1 months", "1 month")
    return q, reply(e, f"{m} + {k} month{'s' if k > 1 else ''} = {e}.")


def parity(rng):
    n = rng.randint(10, 999)
    kind = "even" if n % 2 == 0 else "odd"
    q = rng.choice(["Is {n} even or odd?", "Is the number {n} odd or even?"]).format(n=n)
    return q, reply(kind, f"{n} ends in {n % 10}, which is {kind}.")


def rounding(rng):
    x = round(rng.uniform(1, 99), 3)
    # Half-up on the decimal digits as written (float formatting would round 12.25 to 12.2).
    r = str(Decimal(str(x)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))
    q = rng.choice(
        ["Round {x} to one decimal place.", "What is {x} rounded to one decimal?"]
    ).format(x=x)
    return q, reply(r, f"{x} to one decimal place is {r}.")


FAMILIES = [
    addition,
    subtraction,
    multiplication,
    conversion,
    letters,
    first_letter,
    larger,
    next_day,
    month_after,
    parity,
    rounding,
]


def make(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct chat examples, families interleaved so any prefix is balanced."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        family = FAMILIES[len(out) % len(FAMILIES)]
        for _ in range(100):  # a fresh question of this family
            q, a = family(rng)
            if q not in seen:
                break
        seen.add(q)
        out.append(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
    return out


def main():
    default = pathlib.Path(__file__).resolve().parents[1] / "jqlora" / "data" / "house_style.jsonl"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(default))
    p.add_argument("--n", type=int, default=360)
    args = p.parse_args()
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for ex in make(args.n):
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    print(f"wrote {args.n} examples to {path}")


if __name__ == "__main__":
    main()
