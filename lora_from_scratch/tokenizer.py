"""A character tokenizer with a fixed, documented vocabulary.

Every task in this project is written with a handful of characters, so one
token per character is enough and keeps the model's input easy to read:

    id 0  <pad>   fills the left of shorter prompts in a batch
    id 1  <bos>   starts every sequence
    id 2  <eos>   ends every answer; generation stops there
    id 3.. the characters of ``CHARS`` below, in that order

The vocabulary never changes, so a checkpoint trained today decodes the same
way tomorrow, and ``Tokenizer()`` needs no file.
"""

from __future__ import annotations

from typing import Iterable

# digits and the arithmetic symbols first, then what the word problems need
CHARS = "0123456789+-*=? abcdefghijklmnopqrstuvwxyz.,'"
SPECIALS = ("<pad>", "<bos>", "<eos>")


class Tokenizer:
    """Maps text to token ids and back, one id per character."""

    pad_id = 0
    bos_id = 1
    eos_id = 2

    def __init__(self) -> None:
        self.itos = list(SPECIALS) + list(CHARS)
        self.stoi = {ch: i + len(SPECIALS) for i, ch in enumerate(CHARS)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text to ids; ``bos``/``eos`` add the special tokens around it."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            ids = [self.stoi[ch] for ch in text]
        except KeyError:  # find the first bad character to name it
            pos = next(i for i, ch in enumerate(text) if ch not in self.stoi)
            raise ValueError(
                f"unknown character {text[pos]!r} at position {pos} of {text!r}; "
                f"the vocabulary is {CHARS!r} (lowercase only)"
            ) from None
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], stop_at_eos: bool = True) -> str:
        """Ids to text. Special tokens are dropped; decoding stops at the first
        <eos> unless ``stop_at_eos`` is False."""
        out = []
        for i in ids:
            if isinstance(i, bool) or not hasattr(i, "__index__"):
                raise TypeError(f"token ids must be ints, got {i!r} ({type(i).__name__})")
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i == self.eos_id and stop_at_eos:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return "".join(out)
