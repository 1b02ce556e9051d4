"""Problems as the model sees them: token batches, and files.

- ``encode_batch`` turns a list of ``Problem``s into left-padded token ids,
  an attention mask and the targets of the supervised loss; every objective
  (supervised fine-tuning now, RL later) builds its batches with it.
- ``train_batches`` is the ``step -> batch`` function the training loop
  reads: fresh training problems per step, reproducible from (seed, step).
- ``save_problems`` / ``load_problems`` write and read JSON-lines problem
  files (the fixed evaluation sets in ``data/``); a malformed line (not
  UTF-8, not JSON, an empty prompt or answer, a character outside the
  vocabulary, too long for the model) is an error naming the file and line.

The tasks themselves (what a problem is, the train/test split) live in
``tasks.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .tasks import Problem, Task, stable_hash
from .tokenizer import Tokenizer
from .validate import check_int

MAX_BATCH_SIZE = 65536  # a larger batch does not fit in memory on any machine this runs on


def encode_batch(problems: list[Problem], tok: Tokenizer, with_answer: bool = True) -> dict:
    """Tokenize and left-pad a list of problems.

    Each row is ``<bos> prompt [answer <eos>]``. Left padding puts every
    prompt's last token in the same column, which batched generation needs.
    Returns ``input_ids`` (B, T), ``attention_mask`` (B, T; 1 on real tokens)
    and, with answers, ``targets`` (B, T): the next token at positions whose
    next token is part of the answer or <eos>, and -100 (ignored) elsewhere.
    The model reads ``input_ids[:, :-1]`` and is scored on ``targets[:, :-1]``.
    """
    if not problems:
        raise ValueError("encode_batch needs at least one problem")
    pad = tok.pad_id
    rows, masks, tgts = [], [], []
    encoded = [(tok.encode(p.prompt, bos=True), tok.encode(p.answer, eos=True) if with_answer else [])
               for p in problems]
    T = max(len(q) + len(a) for q, a in encoded)
    for q, a in encoded:
        n_pad = T - len(q) - len(a)
        rows.append([pad] * n_pad + q + a)
        masks.append([0] * n_pad + [1] * (len(q) + len(a)))
        # position t predicts token t+1: only answer/<eos> tokens are scored
        tgts.append([-100] * (n_pad + len(q) - 1) + a + [-100])
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.tensor(masks, dtype=torch.long)
    targets = torch.tensor(tgts, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if with_answer:
        batch["targets"] = targets
    return batch


def train_batches(task: Task, tok: Tokenizer, batch_size: int, seed: int):
    """A function ``step -> batch`` of fresh training problems. Each step's
    problems depend only on (seed, step), so a resumed run sees the same data.
    The function carries ``signature``, what its stream depends on; the
    training loop saves it in checkpoints and refuses to resume with another."""
    batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    seed = check_int("seed", seed, -2**63, 2**64 - 1)  # the range torch.manual_seed takes

    def get_batch(step: int) -> dict:
        return encode_batch(task.sample_train(batch_size, seed=stable_hash(seed, step)), tok)
    get_batch.signature = {"task": task.spec(), "batch_size": batch_size, "seed": seed}
    return get_batch


# ----- files --------------------------------------------------------------
def save_problems(problems: list[Problem], path) -> None:
    """Write problems as JSON lines, atomically (temp file, then rename)."""
    with atomic_write(path) as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")


def load_problems(path, tok: Tokenizer | None = None, block_size: int | None = None) -> list[Problem]:
    """Read a JSON-lines file of ``{"prompt": ..., "answer": ...}``. A bad line
    raises ``ValueError`` naming the file and the line number. With
    ``block_size``, every ``<bos> prompt answer <eos>`` must fit in it."""
    tok = tok or Tokenizer()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {raw[e.start]:#x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) \
                    or not isinstance(rec.get("answer"), str):
                raise ValueError(f'{where}: expected {{"prompt": str, "answer": str}}, got {line.strip()[:80]!r}')
            if not rec["prompt"] or not rec["answer"]:
                raise ValueError(f"{where}: the {'prompt' if not rec['prompt'] else 'answer'} is empty")
            try:
                tok.encode(rec["prompt"] + rec["answer"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            need = len(rec["prompt"]) + len(rec["answer"]) + 2  # with <bos> and <eos>
            if block_size is not None and need > block_size:
                raise ValueError(f"{where}: prompt and answer take {need} tokens with <bos> and <eos>, "
                                 f"the model reads at most block_size={block_size}")
            out.append(Problem(rec["prompt"], rec["answer"]))
    if not out:
        raise ValueError(f"{path}: no problems in file")
    return out
