"""Toy arithmetic tasks: ``add``, ``sub``, ``mul`` and ``wordprob``.

Each task turns a pair of operands ``(a, b)`` into a ``Problem``: a prompt that
ends in ``=`` and the answer the model must write after it, e.g.

    add, 2 digits:   "07+85="  ->  "290"   (92 written as 3 digits, reversed)
    wordprob:        "tom has 12 apples and buys 7 more. how many apples
                      does tom have?="  ->  "910"  (19 -> "019" -> "910")

Answer format (task options, the same for every task):
- ``pad=True`` zero-pads operands (arithmetic tasks only) and the answer to a
  fixed width, so every problem of a task has the same shape;
- ``reverse=True`` writes the answer least-significant digit first, as
  minGPT's adder does. A left-to-right model then produces the ones digit
  first, exactly the order in which carries are computed by hand, so each
  digit depends only on digits it has already seen.

Operands of an n-digit task run over 0..10**n - 1 (word problems: 1..10**n - 1).
``sub`` keeps ``a >= b`` so the answer is never negative.

Train/test split: ``a op b`` is a test problem when a fixed integer hash of
``(op, a, b)`` falls in the lowest 10%. The split depends on the operation and
the operands alone, not on the task or the wording, so a test pair never
appears in training under any template, nor in another task's training set
(a base pretrained on ``add`` has not seen the sums of the ``wordprob`` test
set). The fixed evaluation set is 500 test problems drawn with a fixed seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("add", "sub", "mul", "wordprob")
DEFAULT_DIGITS = {"add": (3, 3), "sub": (3, 3), "mul": (2, 2), "wordprob": (2, 2)}
TEST_FRACTION = 0.10  # share of operand pairs reserved for testing
EVAL_SIZE = 500  # problems in the fixed evaluation set
EVAL_SEED = 1234  # seed that draws the fixed evaluation set

# Word-problem templates: several phrasings per operation, so the model has
# to read the words to know which operation is meant.
NAMES = ("tom", "ann", "sam", "mia", "ben", "eva", "max", "zoe")
OBJECTS = ("apples", "pens", "cards", "books", "coins", "shells", "stickers", "cookies")
TEMPLATES = {
    "+": (
        "{n} has {a} {o} and buys {b} more. how many {o} does {n} have?",
        "{n} had {a} {o}. a friend gave {n} {b} more. how many {o} does {n} have now?",
        "there are {a} {o} in a box and {b} {o} on a desk. how many {o} are there in all?",
    ),
    "-": (
        "{n} has {a} {o} and gives away {b}. how many {o} does {n} have left?",
        "{n} had {a} {o} and lost {b} of them. how many {o} are left?",
        "there were {a} {o} in a jar. {n} took {b} out. how many {o} are in the jar now?",
    ),
    "*": (
        "{n} has {a} bags with {b} {o} in each bag. how many {o} does {n} have?",
        "{n} buys {b} {o} every day for {a} days. how many {o} did {n} buy?",
        "a shelf has {a} rows of {o} and each row holds {b}. how many {o} are on the shelf?",
    ),
}
WORD_OPS = ("+", "-", "*")


@dataclass(frozen=True)
class Problem:
    prompt: str  # text the model reads, ends with "="
    answer: str  # text the model must write after the prompt (before <eos>)


def stable_hash(*values: int) -> int:
    """A fixed 64-bit integer hash (splitmix64 steps). Python's hash() is
    salted per process, so it cannot define a reproducible split."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


class Task:
    """One toy task at one size and answer format.

    ``digits``: operand digits, an int (both operands) or ``(a, b)`` for
    ``mul``; word problems use ``digits[0]`` for both numbers, except ``*``
    which multiplies by a 1-digit number.
    """

    def __init__(self, name: str = "add", digits=None, reverse: bool = True, pad: bool = True):
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
        self.name = name
        self.digits = parse_digits(name, digits)
        self.reverse = bool(reverse)
        self.pad = bool(pad)
        self.op = {"add": "+", "sub": "-", "mul": "*"}.get(name)  # None for wordprob
        self._test_sets: dict[int, list[Problem]] = {}  # test_set() is built once per size

    def __repr__(self) -> str:
        return f"Task({self.name!r}, digits={self.digits}, reverse={self.reverse}, pad={self.pad})"

    def spec(self) -> dict:
        """A JSON-able description, stored in checkpoints and metrics."""
        return {"name": self.name, "digits": list(self.digits), "reverse": self.reverse, "pad": self.pad}

    @classmethod
    def from_spec(cls, spec: dict) -> "Task":
        return cls(spec["name"], tuple(spec["digits"]), spec["reverse"], spec["pad"])

    # ----- operands -------------------------------------------------------
    def _ops(self) -> tuple[str, ...]:
        return WORD_OPS if self.op is None else (self.op,)

    def _ranges(self, op: str) -> tuple[range, range]:
        da, db = self.digits
        if self.name == "wordprob":  # no zero apples in a story
            return range(1, 10**da), range(1, 10 if op == "*" else 10**da)
        return range(10**da), range(10**db)

    def _order(self, op: str, a: int, b: int) -> tuple[int, int]:
        return (max(a, b), min(a, b)) if op == "-" else (a, b)

    def is_test(self, op: str, a: int, b: int) -> bool:
        """True when ``a op b`` belongs to the test split. The task is not part
        of the hash: "12+7" is a test pair for ``add`` and for the word
        problems alike, so a base pretrained on ``add`` never trained on the
        arithmetic of a word problem it is tested on."""
        return stable_hash(ord(op), a, b) % 1000 < TEST_FRACTION * 1000

    # ----- text -----------------------------------------------------------
    def answer_width(self, op: str) -> int:
        da, db = self.digits
        if self.name == "wordprob":
            db = 1 if op == "*" else da
        return {"+": max(da, db) + 1, "-": max(da, db), "*": da + db}[op]

    def answer_text(self, op: str, value: int) -> str:
        text = f"{value:0{self.answer_width(op)}d}" if self.pad else str(value)
        return text[::-1] if self.reverse else text

    def make(self, op: str, a: int, b: int, template: int = 0, name: int = 0, obj: int = 0) -> Problem:
        """The problem for operands (a, b); template/name/obj pick the wording
        of a word problem and are ignored otherwise."""
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        if self.name == "wordprob":
            text = TEMPLATES[op][template].format(n=NAMES[name], o=OBJECTS[obj], a=a, b=b)
            prompt = text + "="
        elif self.pad:
            da, db = self.digits
            prompt = f"{a:0{da}d}{op}{b:0{db}d}="
        else:
            prompt = f"{a}{op}{b}="
        return Problem(prompt, self.answer_text(op, value))

    def max_answer_tokens(self) -> int:
        """Longest answer in tokens, plus one for <eos>."""
        return max(self.answer_width(op) for op in self._ops()) + 1

    # ----- sampling -------------------------------------------------------
    def _draw(self, rng: random.Random, want_test: bool) -> Problem:
        while True:  # rejection sampling: 90% of pairs are train, 10% test
            op = rng.choice(self._ops())
            ra, rb = self._ranges(op)
            a, b = self._order(op, rng.choice(ra), rng.choice(rb))
            if self.is_test(op, a, b) == want_test:
                return self.make(op, a, b, **self._wording(rng))

    def _wording(self, rng: random.Random) -> dict:
        """A random template, name and object for a word problem; nothing for arithmetic."""
        if self.name != "wordprob":
            return {}
        return dict(template=rng.randrange(3), name=rng.randrange(len(NAMES)), obj=rng.randrange(len(OBJECTS)))

    def sample_train(self, n: int, seed: int) -> list[Problem]:
        """``n`` training problems drawn with replacement; same seed, same list."""
        rng = random.Random(seed)
        return [self._draw(rng, want_test=False) for _ in range(n)]

    def test_set(self, n: int = EVAL_SIZE) -> list[Problem]:
        """The fixed evaluation set: up to ``n`` distinct test problems (fewer
        when the test split is smaller, e.g. 1-digit addition)."""
        if n not in self._test_sets:
            self._test_sets[n] = self._build_test_set(n)
        return list(self._test_sets[n])

    def _build_test_set(self, n: int) -> list[Problem]:
        rng = random.Random(EVAL_SEED)
        pairs = sum(len(ra) * len(rb) for ra, rb in map(self._ranges, self._ops()))
        if pairs <= 200_000:  # small: enumerate every test pair, then shuffle
            cands = []
            for op in self._ops():
                ra, rb = self._ranges(op)
                seen = {self._order(op, a, b) for a in ra for b in rb}
                cands += sorted((op, a, b) for a, b in seen if self.is_test(op, a, b))
            rng.shuffle(cands)
            return [self.make(op, a, b, **self._wording(rng)) for op, a, b in cands[:n]]
        out, seen_prompts = [], set()
        while len(out) < n:
            p = self._draw(rng, want_test=True)
            if p.prompt not in seen_prompts:
                seen_prompts.add(p.prompt)
                out.append(p)
        return out

    # ----- scoring --------------------------------------------------------
    @staticmethod
    def check(prediction: str, answer: str) -> bool:
        """Exact match of the generated text (up to <eos>) with the answer."""
        return prediction.strip() == answer

    def reward(self, prediction: str, answer: str) -> float:
        """1.0 for an exactly correct answer, 0.0 otherwise (used by RL)."""
        return 1.0 if self.check(prediction, answer) else 0.0


def parse_digits(name: str, digits) -> tuple[int, int]:
    """Normalise ``digits`` (None, int, "3", "2,3" or a pair) to ``(a, b)``."""
    if digits is None:
        return DEFAULT_DIGITS.get(name, (2, 2))
    if isinstance(digits, str):
        try:
            parts = [int(p) for p in digits.split(",")]
        except ValueError:
            raise ValueError(f"digits must be like '3' or '2,3', got {digits!r}") from None
        digits = parts
    def whole(d):  # ints (numpy ints too), never bools or floats
        if isinstance(d, bool) or not hasattr(d, "__index__"):
            raise TypeError(f"digits must be one or two integers, got {digits!r}")
        return int(d)
    if not isinstance(digits, (list, tuple)):
        digits = (whole(digits),) * 2
    digits = tuple(whole(d) for d in digits)
    if len(digits) == 1:
        digits = digits * 2
    if len(digits) != 2:
        raise ValueError(f"digits must be one or two integers, got {digits!r}")
    if not all(1 <= d <= 6 for d in digits):
        raise ValueError(f"digits must be between 1 and 6, got {digits!r}")
    if name != "mul" and digits[0] != digits[1]:
        raise ValueError(f"task {name!r} takes one operand size, got digits={digits!r}; "
                         "only 'mul' takes two (a-digit by b-digit)")
    return digits
