"""Solutions to the exercises of tutorial 00 (the toy world).

Each definition below replaces the stub of the same name in an exercise
block of tutorials/00_toy_world.md; tests/test_exercises.py runs each
block's checks against it.
"""

import math


# Exercise 1: the answer as the model writes it
def answer_text(value: int, width: int, reverse: bool = True) -> str:
    text = f"{value:0{width}d}"  # zero-padded to the answer's fixed width
    return text[::-1] if reverse else text  # least-significant digit first


# Exercise 2: the targets of one row
def row_targets(prompt_ids: list[int], answer_ids: list[int], n_pad: int) -> list[int]:
    # the row is [pad]*n_pad + prompt + answer; position t is scored on token t+1,
    # so the last prompt token predicts the first answer token, and the row's
    # last position (which predicts nothing) is ignored
    return [-100] * (n_pad + len(prompt_ids) - 1) + list(answer_ids) + [-100]


# Exercise 3: the learning-rate schedule
def lr_schedule(step: int, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps  # linear warmup, reaching lr at step warmup_steps - 1
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
