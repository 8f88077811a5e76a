"""GSM8K-style word problems with worked answers, generated from a seed.

The demo needs arithmetic word problems that a fresh clone can make without downloading a data set.
Each template draws names, items and numbers, states the problem in one of several phrasings, and
writes a short worked solution that ends, as GSM8K's do, with `#### <answer>`. The numbers are drawn
afresh for every problem, so a held-out split shares templates but not problems with the training
split: memorising training answers does not pass it.

Every answer is a whole, positive number that the question makes possible: nothing sold or given
beyond what there is, no change larger than the payment, divisions that come out even
(tests/test_demo_problems.py checks each worked step's arithmetic over many seeds).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

NAMES = [
    "Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal",
    "Kira", "Liam", "Maya", "Noah", "Olivia", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
]
ITEMS = [
    ("apple", "apples"), ("book", "books"), ("pencil", "pencils"), ("marble", "marbles"),
    ("sticker", "stickers"), ("cookie", "cookies"), ("card", "cards"), ("shell", "shells"),
]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("crate", "crates")]


@dataclass
class Problem:
    question: str
    answer: str  # worked solution ending with "#### <number>"

    def as_record(self, ident: str) -> dict:
        return {"id": ident, "question": self.question, "answer": self.answer}


def _solution(steps: list[str], result: int) -> str:
    return "\n".join(steps + [f"#### {result}"])


def _buy_more(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    q = rng.choice([
        f"{name} has {a} {items}. {name} buys {b} more. How many {items} does {name} have now?",
        f"{name} had {a} {items} and then got {b} more {items}. How many {items} does {name} have in total?",
    ])
    return Problem(q, _solution([f"{name} has {a} + {b} = {a + b} {items}."], a + b))


def _give_away(rng: random.Random) -> Problem:
    name, other, (_, items) = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    q = rng.choice([
        f"{name} has {a} {items} and gives {b} of them to {other}. How many {items} does {name} have left?",
        f"There were {a} {items} in {name}'s collection. {name} gave {other} {b} {items}. How many are left?",
    ])
    return Problem(q, _solution([f"{name} has {a} - {b} = {a - b} {items} left."], a - b))


def _containers(rng: random.Random) -> Problem:
    (_, items), (box, boxes) = rng.choice(ITEMS), rng.choice(CONTAINERS)
    n, per = rng.randint(2, 12), rng.randint(3, 25)
    q = rng.choice([
        f"There are {n} {boxes} with {per} {items} in each {box}. How many {items} are there altogether?",
        f"A shop packs {per} {items} into every {box}. It fills {n} {boxes}. How many {items} does it pack?",
    ])
    return Problem(q, _solution([f"There are {n} * {per} = {n * per} {items}."], n * per))


def _share_equally(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    total = friends * each
    q = rng.choice([
        f"{name} shares {total} {items} equally among {friends} friends. How many {items} does each friend get?",
        f"{total} {items} are split evenly into {friends} groups. How many {items} are in each group?",
    ])
    return Problem(q, _solution([f"Each gets {total} / {friends} = {each} {items}."], each))


def _money_change(rng: random.Random) -> Problem:
    name, (item, items) = rng.choice(NAMES), rng.choice(ITEMS)
    n, price = rng.randint(2, 9), rng.randint(2, 12)
    paid = n * price + rng.randint(1, 30)
    cost = n * price
    q = rng.choice([
        f"{name} buys {n} {items} at ${price} each and pays with ${paid}. How much change does {name} get?",
        f"Each {item} costs ${price}. {name} buys {n} of them and hands the cashier ${paid}. "
        f"How many dollars of change does {name} receive?",
    ])
    steps = [f"The {items} cost {n} * {price} = ${cost}.", f"The change is {paid} - {cost} = ${paid - cost}."]
    return Problem(q, _solution(steps, paid - cost))


def _weekly_savings(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    per_week, weeks, spent = rng.randint(3, 30), rng.randint(2, 10), rng.randint(1, 20)
    saved = per_week * weeks
    spent = min(spent, saved - 1)
    q = (f"{name} saves ${per_week} every week for {weeks} weeks, then spends ${spent} on a gift. "
         f"How much money does {name} have left?")
    steps = [f"{name} saves {per_week} * {weeks} = ${saved}.", f"After the gift: {saved} - {spent} = ${saved - spent}."]
    return Problem(q, _solution(steps, saved - spent))


def _two_purchases(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    (_, items_a), (_, items_b) = rng.sample(ITEMS, 2)
    na, pa, nb, pb = rng.randint(2, 8), rng.randint(1, 9), rng.randint(2, 8), rng.randint(1, 9)
    q = (f"{name} buys {na} {items_a} for ${pa} each and {nb} {items_b} for ${pb} each. "
         f"How much does {name} spend in total?")
    steps = [f"The {items_a} cost {na} * {pa} = ${na * pa}.", f"The {items_b} cost {nb} * {pb} = ${nb * pb}.",
             f"In total {na * pa} + {nb * pb} = ${na * pa + nb * pb}."]
    return Problem(q, _solution(steps, na * pa + nb * pb))


def _speed_distance(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    speed, hours = rng.randint(3, 70), rng.randint(2, 9)
    q = rng.choice([
        f"{name} drives at {speed} miles per hour for {hours} hours. How many miles does {name} drive?",
        f"A train travels {speed} miles every hour. How far does it go in {hours} hours?",
    ])
    return Problem(q, _solution([f"The distance is {speed} * {hours} = {speed * hours} miles."], speed * hours))


def _twice_as_many(rng: random.Random) -> Problem:
    name, other, (_, items) = *rng.sample(NAMES, 2), rng.choice(ITEMS)
    a, factor = rng.randint(2, 30), rng.choice([2, 3, 4])
    word = {2: "twice", 3: "three times", 4: "four times"}[factor]
    q = (f"{name} has {a} {items}. {other} has {word} as many {items} as {name}. "
         f"How many {items} do they have together?")
    steps = [f"{other} has {a} * {factor} = {a * factor} {items}.",
             f"Together they have {a} + {a * factor} = {a + a * factor} {items}."]
    return Problem(q, _solution(steps, a + a * factor))


def _minutes_total(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    per_day, days, extra = rng.randint(10, 60), rng.randint(2, 7), rng.randint(5, 45)
    q = (f"{name} practises piano for {per_day} minutes a day for {days} days, and then for {extra} minutes "
         f"on the weekend. How many minutes does {name} practise in all?")
    steps = [f"On weekdays: {per_day} * {days} = {per_day * days} minutes.",
             f"In all: {per_day * days} + {extra} = {per_day * days + extra} minutes."]
    return Problem(q, _solution(steps, per_day * days + extra))


def _remaining_after_sales(rng: random.Random) -> Problem:
    (_, items) = rng.choice(ITEMS)
    morning, afternoon = rng.randint(5, 40), rng.randint(5, 40)
    start = rng.randint(max(50, morning + afternoon + 1), 200)  # the store cannot sell more than it has
    q = (f"A store has {start} {items}. It sells {morning} in the morning and {afternoon} in the afternoon. "
         f"How many {items} are left?")
    sold = morning + afternoon
    steps = [f"It sells {morning} + {afternoon} = {sold} {items}.", f"Left: {start} - {sold} = {start - sold}."]
    return Problem(q, _solution(steps, start - sold))


def _half_left(rng: random.Random) -> Problem:
    name, (_, items) = rng.choice(NAMES), rng.choice(ITEMS)
    half = rng.randint(3, 40)
    start, eaten = 2 * half, rng.randint(1, half - 1)
    q = (f"{name} has {start} {items}. {name} gives away half of them and then loses {eaten}. "
         f"How many {items} does {name} have now?")
    steps = [f"Half of {start} is {start} / 2 = {half}.", f"Then {half} - {eaten} = {half - eaten}."]
    return Problem(q, _solution(steps, half - eaten))


TEMPLATES: list[Callable[[random.Random], Problem]] = [
    _buy_more, _give_away, _containers, _share_equally, _money_change, _weekly_savings,
    _two_purchases, _speed_distance, _twice_as_many, _minutes_total, _remaining_after_sales, _half_left,
]


def generate_problems(n: int, seed: int) -> list[Problem]:
    """`n` distinct problems, the templates taken in turn so every split covers all of them."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < n:
        problem = TEMPLATES[len(problems) % len(TEMPLATES)](rng)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def split_problems(n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out splits: no held-out question appears in the training split.

    The held-out problems come first in the seeded stream, so they depend only on `n_test` and `seed`:
    runs that train on more or fewer problems are scored on the same questions.
    """
    problems = generate_problems(n_test + n_train, seed)
    return problems[n_test:], problems[:n_test]
