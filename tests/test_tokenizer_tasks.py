import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_from_scratch.data import encode_batch, load_problems, save_problems, train_batches
from lora_from_scratch.tasks import TASKS, TEMPLATES, Problem, Task, parse_digits
from lora_from_scratch.tokenizer import CHARS, Tokenizer

REPO = Path(__file__).resolve().parent.parent


def test_round_trip(tok):
    text = "tom has 12 apples, ann's 7. how many? 3*4=21-9+0"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(CHARS)) == CHARS
    assert len(set(tok.encode(CHARS))) == len(CHARS) == tok.vocab_size - 3


def test_decode_stops_at_eos_and_skips_pads(tok):
    ids = [tok.pad_id, tok.bos_id] + tok.encode("12") + [tok.eos_id] + tok.encode("99")
    assert tok.decode(ids) == "12"
    assert tok.decode(ids, stop_at_eos=False) == "1299"


def test_unknown_character_names_char_and_position(tok):
    with pytest.raises(ValueError, match=r"'A' at position 4"):
        tok.encode("tom A")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([999])
    with pytest.raises(TypeError):
        tok.encode(12)


def _word_operands(prompt: str):
    """(op, a, b) of a word problem, read back through its template."""
    for op, templates in TEMPLATES.items():
        for t in templates:
            rx = re.escape(t + "=").replace(r"\{n\}", "[a-z]+").replace(r"\{o\}", "[a-z]+")
            rx = rx.replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
            m = re.fullmatch(rx, prompt)
            if m:
                return op, int(m["a"]), int(m["b"])
    raise AssertionError(f"no template matches {prompt!r}")


@pytest.mark.parametrize("name,digits", [("add", 2), ("add", 3), ("sub", 2), ("mul", "2,2"), ("wordprob", 2)])
def test_train_and_test_never_overlap(name, digits):
    task = Task(name, digits)
    test = {p.prompt for p in task.test_set()}
    train = {p.prompt for p in task.sample_train(4000, seed=1)}
    assert len(test) == len(task.test_set()) > 450  # distinct; 2-digit sub has only ~480 test pairs
    assert not test & train
    if name == "wordprob":  # the split is by operands: no test pair appears under any wording
        test_ops = {_word_operands(p) for p in test}
        train_ops = {_word_operands(p) for p in train}
        assert len(test_ops) > 400 and not test_ops & train_ops


def test_small_tasks_have_smaller_test_sets():
    task = Task("mul", "2,1")  # 1000 pairs, about 10% of them test pairs
    assert 50 < len(task.test_set()) < 200
    assert not {p.prompt for p in task.test_set()} & {p.prompt for p in task.sample_train(2000, seed=0)}


def test_split_and_sampling_are_deterministic():
    a, b = Task("add", 3), Task("add", 3)
    assert a.test_set() == b.test_set()
    assert a.sample_train(50, seed=7) == b.sample_train(50, seed=7)
    assert a.sample_train(50, seed=7) != a.sample_train(50, seed=8)
    get = train_batches(a, Tokenizer(), 16, seed=3)
    assert torch.equal(get(5)["input_ids"], get(5)["input_ids"])
    assert not torch.equal(get(5)["input_ids"], get(6)["input_ids"])


def test_answers_are_correct_in_every_format():
    for reverse in (True, False):
        for pad in (True, False):
            t = Task("add", 2, reverse=reverse, pad=pad)
            for p in t.sample_train(30, seed=0):
                a, b = (int(x) for x in p.prompt[:-1].split("+"))
                ans = p.answer[::-1] if reverse else p.answer
                assert int(ans) == a + b
                assert len(p.answer) == 3 or not pad
    for p in Task("sub", 3).sample_train(30, seed=0):
        a, b = (int(x) for x in p.prompt[:-1].split("-"))
        assert a >= b and int(p.answer[::-1]) == a - b
    for p in Task("mul", "2,3").sample_train(30, seed=0):
        a, b = p.prompt[:-1].split("*")
        assert (len(a), len(b)) == (2, 3) and int(p.answer[::-1]) == int(a) * int(b)


def test_wordprob_uses_every_operation_and_several_templates():
    probs = Task("wordprob", 2).test_set()
    assert len({p.prompt.split(" ")[1] for p in probs}) > 3  # verbs/phrasings vary
    for p in probs[:50]:
        assert p.prompt.endswith("?=")
    words = " ".join(p.prompt for p in probs)
    assert "more" in words and "left" in words and "each" in words


def test_check_and_reward():
    t = Task("add", 2)
    assert t.check("540", "540") and t.reward("540", "540") == 1.0
    assert not t.check("54", "540") and t.reward("541", "540") == 0.0


def test_bad_task_and_digits():
    with pytest.raises(ValueError, match="unknown task 'div'"):
        Task("div")
    with pytest.raises(ValueError, match="between 1 and 6"):
        Task("add", 7)
    with pytest.raises(ValueError, match="between 1 and 6"):
        parse_digits("mul", "0,2")
    with pytest.raises(ValueError, match="only 'mul'"):
        Task("add", "2,3")
    with pytest.raises(ValueError, match="like '3' or '2,3'"):
        Task("add", "two")


def test_encode_batch_left_pads_and_masks_targets(tok):
    probs = [Problem("1+2=", "3"), Problem("tom has 1 pen.=", "42")]
    b = encode_batch(probs, tok)
    ids, mask, tgt = b["input_ids"], b["attention_mask"], b["targets"]
    assert ids.shape == mask.shape == tgt.shape
    assert ids[0, 0] == tok.pad_id and mask[0, 0] == 0 and mask[1].all()
    assert (ids[:, -1] == tok.eos_id).all()
    # targets hold exactly the answer tokens and <eos>, each at the position before it
    for row, p in enumerate(probs):
        scored = tgt[row][tgt[row] != -100].tolist()
        assert scored == tok.encode(p.answer, eos=True)
        t = (tgt[row] != -100).nonzero()[0, 0]
        assert ids[row, t + 1] == scored[0]
    prompts_only = encode_batch(probs, tok, with_answer=False)
    assert "targets" not in prompts_only and (prompts_only["input_ids"][:, -1] == tok.encode("=")[0]).all()


def test_save_and_load_problems(tmp_path):
    probs = Task("mul", "2,2").test_set()[:20]
    save_problems(probs, tmp_path / "m.jsonl")
    assert load_problems(tmp_path / "m.jsonl") == probs


@pytest.mark.parametrize("line,msg", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "1+1="}', "expected"),
    ('["1+1=", "2"]', "expected"),
    ('{"prompt": "1+1=", "answer": "Z"}', "unknown character 'Z'"),
])
def test_malformed_data_line_names_file_and_line(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "20"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{msg}"):
        load_problems(path)
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "missing.jsonl")


def test_data_files_regenerate_bit_for_bit(tmp_path):
    subprocess.run([sys.executable, "-m", "lora_from_scratch", "data", "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in TASKS:
        ours = (tmp_path / f"{name}.jsonl").read_bytes()
        committed = (REPO / "data" / f"{name}.jsonl").read_bytes()
        assert ours == committed, f"data/{name}.jsonl differs from what the code generates"
        assert len(ours.splitlines()) == 500
        json.loads(ours.splitlines()[0])


def test_split_is_shared_across_tasks():
    # a base pretrained on `add` never trains on the sums of the word-problem test set
    add, word = Task("add", 2), Task("wordprob", 2)
    word_test = {_word_operands(p.prompt) for p in word.test_set()}
    plus = {(a, b) for op, a, b in word_test if op == "+"}
    assert plus and all(add.is_test("+", a, b) for a, b in plus)
    train_pairs = {tuple(int(x) for x in p.prompt[:-1].split("+")) for p in add.sample_train(5000, seed=0)}
    assert not plus & train_pairs


@pytest.mark.parametrize("digits", [True, 2.5, (2, True), (2.0, 1)])
def test_digits_must_be_whole_numbers_not_bools_or_floats(digits):
    with pytest.raises(TypeError, match="digits must be one or two integers"):
        parse_digits("mul", digits)


def test_numpy_digits_are_accepted():
    import numpy as np
    assert parse_digits("mul", (np.int64(2), np.int32(1))) == (2, 1)
