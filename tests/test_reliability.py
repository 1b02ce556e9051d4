"""Bad input never ends in a traceback, a silently wrong answer or a lost file.

A table of bad command lines: each must exit with code 2 before any work,
print one clear line naming the offending flag or path, and leave every
file as it was. The same for the Python API, then the faults: a save
killed half way, a full disk, a run whose weights turn NaN, and a resume
with other data settings.
"""

import argparse
import json
import math
import os
import signal
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from lora_from_scratch import __main__ as cli
from lora_from_scratch.adapters import add_adapters, load_adapters, save_adapters
from lora_from_scratch.checkpoint import atomic_save, atomic_write, load_model, safe_load, save_model, write_json
from lora_from_scratch.data import encode_batch, load_problems, train_batches
from lora_from_scratch.dylora import DyLoRALinear, DyLoRAOptions
from lora_from_scratch.lora import LoRALinear, evaluate_ranks, lora_scale
from lora_from_scratch.matryoshka import MatryoshkaLoRALinear, matryoshka_P
from lora_from_scratch.model import GPTConfig, TinyGPT
from lora_from_scratch.recipes import FinetuneConfig, PretrainConfig
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer
from lora_from_scratch.train import TrainConfig, sft_loss, train

TINY = dict(n_layer=1, n_head=2, n_embd=32)


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(**{"vocab_size": Tokenizer().vocab_size, **TINY, **kw}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files of every kind, good and bad, in one folder."""
    d = tmp_path_factory.mktemp("rel")
    f = {"d": d}
    save_model(_tiny(), d / "base.pt", metrics={"task": Task("add", 1).spec()})
    f["ck"] = d / "base.pt"
    (d / "bad.pt").write_bytes(b"\x00garbage, not a checkpoint")
    f["bad"] = d / "bad.pt"
    (d / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    f["random"] = d / "random.pt"
    torch.save({"kind": "tinygpt", "x": argparse.Namespace(a=1)}, d / "code.pt")  # a pickled object
    f["code"] = d / "code.pt"
    save_model(_tiny(vocab_size=60), d / "vocab60.pt")
    f["vocab"] = d / "vocab60.pt"
    m = _tiny()
    atomic_save({"kind": "tinygpt", "config": vars(m.config),
                 "model": {k: v.fill_(float("nan")) if k == "wte.weight" else v for k, v in m.state_dict().items()},
                 "meta": {}}, d / "nan.pt")
    f["nan"] = d / "nan.pt"
    m = _tiny()
    add_adapters(m, lambda lin: LoRALinear(lin, 2, 4))
    save_adapters(m, d / "adapters.pt")
    f["ad"] = d / "adapters.pt"
    good = '{"prompt": "1+2=", "answer": "30"}\n'
    for name, text in {"data": good, "badjson": good + "{oops\n", "emptyp": '{"prompt": "", "answer": "1"}\n',
                       "emptya": good + '{"prompt": "1+2=", "answer": ""}\n',
                       "long": json.dumps({"prompt": "1" * 200 + "=", "answer": "1"}) + "\n",
                       "badchar": '{"prompt": "1+2=", "answer": "3!"}\n', "empty": "\n"}.items():
        (d / f"{name}.jsonl").write_text(text)
        f[name] = d / f"{name}.jsonl"
    (d / "latin1.jsonl").write_bytes(good.encode() + '{"prompt": "caf\xe9=", "answer": "1"}\n'.encode("latin-1"))
    f["latin1"] = d / "latin1.jsonl"
    (d / "plain.txt").write_text("a regular file\n")
    f["file"] = d / "plain.txt"
    (d / "sub").mkdir()
    os.symlink(d / "base.pt", d / "link.pt")
    f["link"] = d / "link.pt"
    f["dotdot"] = d / "sub" / ".." / "base.pt"
    (d / "ro").mkdir()
    f["ro"] = d / "ro"
    f["none"] = ""  # an empty argument, e.g. an unset shell variable
    return f


def _snapshot(d: Path) -> dict:
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


# Defaults that keep a row cheap should it get past its check (none should)
DEFAULTS = {"finetune": ["--base", "{ck}", "--task", "sub", "--digits", "1", "--steps", "2", "--batch-size", "4"],
            "pretrain": ["--task", "add", "--digits", "1", "--steps", "2", "--batch-size", "4", "--n-layer", "1",
                         "--n-embd", "32", "--n-head", "2", "--out", "{d}/new.pt"],
            "eval": ["--ckpt", "{ck}", "--task", "add", "--digits", "1"],
            "demo": ["--digits", "1", "--finetune-steps", "2", "--cache-dir", "{d}/cache"],
            "data": ["--out", "{d}/newdata"]}

ROWS = [
    # ----- lost files: an output that is an input, or another output
    ("eval --metrics-out {ck}", "--metrics-out {ck} is the same file as --ckpt"),
    ("finetune --metrics-out {ck}", "is the same file as --base"),
    ("finetune --save-adapters {ck}", "--save-adapters {ck} is the same file as --base"),
    ("finetune --save-adapters {dotdot}", "is the same file as --base"),
    ("eval --ckpt {link} --metrics-out {ck}", "is the same file as --ckpt"),
    ("eval --data {data} --metrics-out {data}", "is the same file as --data"),
    ("finetune --save-adapters {d}/x.pt --metrics-out {d}/x.pt", "is the same file as --metrics-out"),
    ("pretrain --out {d}/m.pt --metrics-out {d}/m.pt", "is the same file as --metrics-out"),
    ("pretrain --out {ck} --metrics-out {d}/sub/../base.pt", "is the same file as --metrics-out"),
    # ----- outputs that cannot be written, checked before the work
    ("eval --metrics-out {d}", "--metrics-out {d} is a folder"),
    ("eval --metrics-out {file}/m.json", "which is a file, not a folder"),
    ("pretrain --out {d}/sub", "--out {d}/sub is a folder"),
    ("pretrain --out {file}/x.pt", "which is a file, not a folder"),
    ("pretrain --metrics-out {file}/deeper/m.json", "--metrics-out"),
    ("finetune --save-adapters {d}", "--save-adapters {d} is a folder"),
    ("finetune --save-adapters {file}/a.pt", "--save-adapters"),
    ("finetune NOBASE --cache-dir {file}", "--cache-dir {file} is a file, not a folder"),
    ("finetune NOBASE --cache-dir {file}/sub", "--cache-dir"),
    ("data --out {file}", "--out {file} is a file, not a folder"),
    ("data --out {file}/sub", "--out"),
    ("demo --cache-dir {file}", "--cache-dir {file} is a file"),
    ("demo --metrics-out {d}", "--metrics-out {d} is a folder"),
    ("data --out {none}", "--out is empty"),
    ("eval --metrics-out {none}", "--metrics-out is empty"),
    # ----- numbers out of range, not finite, not numbers: named, before any work
    ("pretrain --batch-size 0", "--batch-size: must be an int in 1..65536, got 0"),
    ("pretrain --batch-size -3", "--batch-size"),
    ("pretrain --batch-size 100000000", "--batch-size: must be an int in 1..65536"),
    ("finetune --batch-size 0", "--batch-size"),
    ("pretrain --seed 99999999999999999999999", "--seed"),
    ("pretrain --seed -1", "--seed"),
    ("finetune --base-seed -5 NOBASE", "--base-seed"),
    ("pretrain --pos-init-std -1", "--pos-init-std: must be a number >= 0.0"),
    ("pretrain --pos-init-std nan", "--pos-init-std: must be a finite number"),
    ("finetune --alpha 0", "--alpha: must be > 0"),
    ("finetune --alpha nan", "--alpha: must be a finite number"),
    ("finetune --alpha inf", "--alpha: must be a finite number"),
    ("finetune --alpha x", "--alpha: not a number"),
    ("finetune --lr inf", "--lr: must be a finite number"),
    ("pretrain --lr 0", "--lr: must be > 0"),
    ("pretrain --lr nan", "--lr"),
    ("finetune --eval-ranks 2,x", "--eval-ranks: expected comma-separated integers"),
    ("finetune --eval-ranks 16", "--eval-ranks must be a non-empty set of ints within 1..8, got 16"),
    ("finetune --eval-ranks 0,2", "--eval-ranks"),
    ("finetune --eval-ranks {none}", "--eval-ranks is empty"),
    ("finetune --base {none}", "--base is empty"),
    ("eval --data {none}", "--data is empty"),
    ("finetune --targets {none}", "--targets is empty"),
    ("finetune --steps 0", "--steps: must be an int >= 1"),
    ("pretrain --steps -1", "--steps"),
    ("pretrain --n-layer 0", "--n-layer"),
    ("pretrain --n-embd -4", "--n-embd"),
    ("pretrain --n-head 3 --n-embd 32", "n_embd=32 is not divisible by n_head=3"),
    ("pretrain --eval-every -1", "--eval-every"),
    ("eval --samples -1", "--samples"),
    ("demo --finetune-steps 0", "--finetune-steps"),
    ("finetune --rank 0", "--rank: must be an int >= 1"),
    ("finetune --rank 2.5", "--rank: not an int: '2.5'"),
    ("pretrain --digits 9", "--digits must be between 1 and 6"),
    ("pretrain --digits x", "--digits must be like '3' or '2,3'"),
    ("finetune --base-digits 9 NOBASE --cache-dir {d}/cache", "--base-digits: digits must be between 1"),
    ("demo --digits 0", "--digits must be between 1 and 6"),
    ("pretrain --lr abc", "--lr: not a number"),
    ("eval --threads 0", "--threads: must be an int in 1..256, got 0"),
    ("eval --threads 100000", "--threads: must be an int in 1..256"),
    # ----- flags that do not apply
    ("finetune --scale none --alpha 5", "--alpha 5.0 does not apply with --scale none"),
    ("finetune --base-task mul", "with --base {ck}, --base-task does not apply (they choose the cached base)"),
    ("finetune --base-seed 3 --base-digits 2", "--base-digits and --base-seed do not apply"),
    ("finetune --cache-dir {d}/cache", "--cache-dir does not apply"),
    ("finetune --method lora --unfrozen", "--unfrozen is an option of --method dylora"),
    ("finetune --method lora --train-ranks 999 --unfrozen", "is an option of --method dylora"),
    ("finetune --method matryoshka --unfrozen", "--unfrozen is an option of --method dylora"),
    ("finetune --method dylora --train-ranks 999", "--train-ranks must be a non-empty set of ints within 1..8"),
    ("finetune --method matryoshka --train-ranks 0,2", "--train-ranks must be a non-empty set of ints >= 1, got 0"),
    ("finetune --method dylora --train-ranks 2,x", "--train-ranks: expected comma-separated integers"),
    ("finetune --method lora --eval-ranks 1 --rank 2 --targets qkv", "match no nn.Linear"),
    ("finetune --targets ,", "match no nn.Linear"),
    ("finetune --method lora --gralora-k 2", "--gralora-k is an option of --method gralora"),
    ("finetune --method gralora --gralora-k x", "--gralora-k: invalid literal for int()"),
    ("finetune --method gralora --gralora-k 0", "GraLoRA k (blocks per side) must be an int >= 1, got 0"),
    ("finetune --method gralora --hybrid-r -1", "hybrid_r must be an int >= 0"),
    ("finetune --method mixlora --balance nan", "--balance must be a finite number, got nan"),
    ("finetune --method remix --selections 1", "--selections (M) must be an int >= 2"),
    ("finetune --method lora --experts 4", "--experts is an option of --method remix / mixlora"),
    ("finetune --rank 64", "rank must be an int in 1..min(in, out) = 1..32"),
    # ----- files that are not what they should be
    ("eval --ckpt {bad}", "{bad} is not a readable model checkpoint (not a file torch.save wrote"),
    ("eval --ckpt {random}", "{random} is not a readable model checkpoint"),
    ("eval --ckpt {code}", "holds Python objects that a safe (weights_only) load does not run"),
    ("eval --ckpt {d}", "no model checkpoint at {d} (it is a folder)"),
    ("eval --ckpt {d}/missing.pt", "no model checkpoint at {d}/missing.pt"),
    ("eval --ckpt {vocab}", "is a model over 60 token ids, the tokenizer has 48"),
    ("eval --ckpt {nan}", "wte.weight holds non-finite values"),
    ("eval --ckpt {ad}", "is not a TinyGPT checkpoint"),
    ("finetune --base {bad}", "not a readable model checkpoint"),
    ("finetune --base {ad}", "is not a TinyGPT checkpoint"),
    ("eval --data {latin1}", "latin1.jsonl:2: not UTF-8 text"),
    ("eval --data {long}", "long.jsonl:1: prompt and answer take 204 tokens with <bos> and <eos>, the model "
                           "reads at most block_size=128"),
    ("eval --data {emptyp}", "emptyp.jsonl:1: the prompt is empty"),
    ("eval --data {emptya}", "emptya.jsonl:2: the answer is empty"),
    ("eval --data {badjson}", "badjson.jsonl:2: not valid JSON"),
    ("eval --data {badchar}", "badchar.jsonl:1: unknown character '!'"),
    ("eval --data {empty}", "empty.jsonl: no problems in file"),
    ("eval --data {d}/missing.jsonl", "no data file at"),
    ("eval --data {d}", "(it is a folder)"),
    # ----- argparse's own checks
    ("eval --task div", "invalid choice: 'div'"),
    ("finetune --method nope", "invalid choice: 'nope'"),
    ("finetune --device tpu", "invalid choice: 'tpu'"),
]


# The rl command, when this checkout has it: the generic checks apply to it as to every command
RL_ROWS = [
    ("rl --metrics-out {ck}", "--metrics-out {ck} is the same file as --base"),
    ("rl --save-adapters {ck}", "--save-adapters {ck} is the same file as --base"),
    ("rl --save-adapters {d}", "--save-adapters {d} is a folder"),
    ("rl --metrics-out {file}/m.json", "which is a file, not a folder"),
    ("rl --beta nan", "--beta must be a finite number"),
    ("rl --eps-high inf", "--eps-high must be a finite number"),
    ("rl --temperature nan", "--temperature must be a finite number"),
    ("rl --lr inf", "--lr"),
    ("rl --seed 99999999999999999999999", "--seed"),
    ("rl --base-seed -1", "--base-seed"),
    ("rl --rank 0", "--rank"),
    ("rl --alpha 0", "--alpha"),
    ("rl --scale none --alpha 4", "--alpha 4.0 does not apply with --scale none"),
    ("rl --method lora --unfrozen", "--unfrozen is an option of --method dylora"),
    ("rl --cache-dir {d}/cache", "--cache-dir does not apply"),
    ("rl --base-seed 3", "--base-seed does not apply"),
    ("rl --base-steps 5", "--base-steps does not apply"),
    ("rl --group-size 0", "--group-size"),
    ("rl --prompts 0", "--prompts"),
    ("rl --mu 0", "--mu"),
    ("rl --temperature 0", "--temperature"),
    ("rl --max-new-tokens 0", "--max-new-tokens"),
    ("rl --steps -1", "--steps"),
    ("rl --steps 0", "--steps"),
    ("rl --eval-every -1", "eval_every"),
]
COMMANDS = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
if "rl" in COMMANDS:
    ROWS += RL_ROWS
    DEFAULTS["rl"] = ["--base", "{ck}", "--task", "add", "--digits", "1", "--steps", "1", "--prompts", "2",
                      "--group-size", "2", "--eval-every", "0"]


def _argv(row: str, f: dict) -> list[str]:
    argv = [a.format(**f) for a in row.split() if a != "NOBASE"]
    given = set(argv) | ({"--base"} if "NOBASE" in row else set())  # NOBASE: use the cached base, no --base
    defaults = DEFAULTS[argv[0]]
    for i in range(0, len(defaults), 2):  # flag, value pairs not already in the row
        if defaults[i] not in given:
            argv += [defaults[i], defaults[i + 1].format(**f)]
    return argv + ["--quiet", "--device", "cpu"]


def _run_cli(argv, capsys) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("row,message", ROWS, ids=[r for r, _ in ROWS])
def test_bad_command_line(row, message, files, capsys):
    before = _snapshot(files["d"])
    rc, err = _run_cli(_argv(row, files), capsys)
    assert rc == 2, err
    assert message.format(**files) in err, err
    assert "Traceback" not in err
    if "usage:" not in err:  # our own errors: one line
        assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "weights_only=False" not in err  # never advise the unsafe load
    assert _snapshot(files["d"]) == before  # every file as it was, nothing new


def test_table_is_large_enough():
    assert len(ROWS) >= 60


def test_unwritable_outputs_are_refused_before_work(files, capsys, monkeypatch):
    # os.access stands in for permissions here: the tests may run as root, who may write anywhere
    ro = str(files["ro"])
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(ro) else real(p, mode, **kw))
    for row, message in [("eval --metrics-out {ro}/m.json", "folder {ro} is not writable"),
                         ("pretrain --out {ro}/x.pt", "--out {ro}/x.pt cannot be written"),
                         ("finetune --save-adapters {ro}/deep/a.pt", "--save-adapters"),
                         ("data --out {ro}", "--out {ro} is not writable")]:
        before = _snapshot(files["d"])
        rc, err = _run_cli(_argv(row, files), capsys)
        assert rc == 2 and message.format(**files) in err and err.count("\n") == 1, err
        assert _snapshot(files["d"]) == before


def test_a_new_command_gets_the_output_checks_for_free(files, capsys):
    """A command added later (an ``rl`` command, say) with the usual flag
    names is checked like the others, without code of its own."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("newcmd")
    p.add_argument("--ckpt")
    p.add_argument("--out")
    p.add_argument("--beta", type=float)
    p.add_argument("--seed", type=int, default=0)
    for argv, message in [(["--ckpt", str(files["ck"]), "--out", str(files["ck"])], "same file as --ckpt"),
                          (["--out", str(files["d"])], "--out"),
                          (["--beta", "nan"], "--beta must be a finite number"),
                          (["--seed", str(2**70)], r"--seed must be in 0..2\*\*63-1")]:
        a = parser.parse_args(["newcmd", *argv])
        with pytest.raises(ValueError, match=message):
            cli.check_command(parser, a)


def test_a_good_command_still_runs(files, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc, err = _run_cli(["eval", "--ckpt", str(files["link"]), "--data", str(files["data"]), "--device", "cpu",
                        "--metrics-out", str(out)], capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())["test_exact_match"] in (0.0, 1.0)


# ----- the Python API -----------------------------------------------------------
def _lin():
    torch.manual_seed(0)
    return nn.Linear(8, 6)


API_ROWS = [
    (lambda: LoRALinear(_lin(), 2.5, 8), ValueError, r"rank must be an int in 1..min\(in, out\) = 1..6.*2.5"),
    (lambda: LoRALinear(_lin(), True, 8), ValueError, "rank must be an int"),
    (lambda: LoRALinear(_lin(), "2", 8), ValueError, "rank must be an int"),
    (lambda: LoRALinear(_lin(), 2, "8"), TypeError, r"alpha must be a number, got '8' \(str\)"),
    (lambda: LoRALinear(_lin(), 2, None), TypeError, r"alpha must be a number, got None"),
    (lambda: LoRALinear(_lin(), 2, float("nan")), ValueError, "alpha must be a finite number, got nan"),
    (lambda: LoRALinear(_lin(), 2, 0.0), ValueError, "alpha must be > 0"),
    (lambda: LoRALinear(_lin(), 2, 4, dropout=float("nan")), ValueError, "dropout must be a finite number"),
    (lambda: LoRALinear(_lin(), 2, 4).set_rank(1.5), TypeError, "sub-rank must be an int, got 1.5"),
    (lambda: lora_scale(4, float("inf")), ValueError, "alpha must be a finite number"),
    (lambda: DyLoRALinear(_lin(), 4, 8, ranks=[2.5]), TypeError, r"DyLoRA ranks\[0\] must be an int, got 2.5"),
    (lambda: DyLoRALinear(_lin(), 4, 8, ranks=[1.9]), TypeError, "must be an int, got 1.9"),
    (lambda: DyLoRALinear(_lin(), 4, 8, ranks=4), TypeError, r"DyLoRA ranks must be a list of ints, got 4 \(int\)"),
    (lambda: DyLoRALinear(_lin(), 4, 8, ranks=["2"]), TypeError, r"ranks\[0\] must be an int, got '2'"),
    (lambda: DyLoRALinear(_lin(), 4, 8, ranks=[5]), ValueError, "within 1..4"),
    (lambda: DyLoRALinear(_lin(), 4, 8, frozen="no"), TypeError, "frozen must be True or False, got 'no'"),
    (lambda: DyLoRAOptions(train_ranks=[1.5]), TypeError, r"train_ranks\[0\] must be an int"),
    (lambda: DyLoRAOptions(unfrozen=1), TypeError, "unfrozen must be True or False, got 1"),
    (lambda: MatryoshkaLoRALinear(_lin(), 4, 8, train_ranks=[2.5]), TypeError, r"train_ranks\[0\] must be an int"),
    (lambda: matryoshka_P(4, "24"), TypeError, "train_ranks must be a list of ints, got '24'"),
    (lambda: matryoshka_P(4.0), TypeError, "max_rank must be an int"),
    (lambda: add_adapters(_tiny(), lambda l: LoRALinear(l, 2, 4), targets=5), TypeError,
     r"targets must be a str or a list of str, got 5 \(int\)"),
    (lambda: add_adapters(_tiny(), lambda l: LoRALinear(l, 2, 4), targets=[5]), TypeError, "targets must be"),
    (lambda: FinetuneConfig(rank=2.5), TypeError, "rank must be an int, got 2.5"),
    (lambda: FinetuneConfig(rank=True), TypeError, "rank must be an int, got True"),
    (lambda: FinetuneConfig(rank=np.bool_(True)), TypeError, "rank must be an int, got "),
    (lambda: FinetuneConfig(alpha="x"), TypeError, "alpha must be a number, got 'x'"),
    (lambda: FinetuneConfig(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    (lambda: FinetuneConfig(alpha=0), ValueError, "alpha must be > 0"),
    (lambda: FinetuneConfig(scale="none", alpha=5), ValueError, "alpha=5 does not apply with scale='none'"),
    (lambda: FinetuneConfig(scale="bogus"), ValueError, "scale must be one of"),
    (lambda: FinetuneConfig(eval_ranks=[2.5]), TypeError, r"eval_ranks\[0\] must be an int"),
    (lambda: FinetuneConfig(eval_ranks=4), TypeError, "eval_ranks must be a list of ints"),
    (lambda: FinetuneConfig(rank=8, eval_ranks=[16]), ValueError, "eval_ranks must be a non-empty set of ints within"),
    (lambda: FinetuneConfig(batch_size=0), ValueError, "batch_size must be an int in 1..65536, got 0"),
    (lambda: FinetuneConfig(lr=float("inf")), ValueError, "lr must be a finite number"),
    (lambda: FinetuneConfig(seed=2**70), ValueError, "seed must be an int in 0.."),
    (lambda: FinetuneConfig(method="dylora", options={"train_ranks": [99]}), ValueError, "train_ranks must be"),
    (lambda: FinetuneConfig(targets=5), TypeError, "targets must be a str or a list of str"),
    (lambda: FinetuneConfig(base="add"), TypeError, "base must be a PretrainConfig"),
    (lambda: PretrainConfig(batch_size=0), ValueError, "batch_size must be an int in 1..65536"),
    (lambda: PretrainConfig(pos_init_std=-1), ValueError, "pos_init_std must be a number >= 0.0"),
    (lambda: PretrainConfig(pos_init_std=float("nan")), ValueError, "pos_init_std must be a finite number"),
    (lambda: PretrainConfig(lr=float("nan")), ValueError, "lr must be a finite number"),
    (lambda: PretrainConfig(seed=-1), ValueError, "seed must be an int in 0.."),
    (lambda: PretrainConfig(steps=1.5), TypeError, "steps must be an int, got 1.5"),
    (lambda: PretrainConfig(n_layer=True), TypeError, "n_layer must be an int, got True"),
    (lambda: PretrainConfig(stop_when_solved="yes"), TypeError, "stop_when_solved must be True or False"),
    (lambda: TrainConfig(lr=float("inf")), ValueError, "lr must be a finite number"),
    (lambda: TrainConfig(steps=2.5), TypeError, "steps must be an int"),
    (lambda: TrainConfig(grad_clip=float("nan")), ValueError, "grad_clip must be a finite number"),
    (lambda: TrainConfig(resume="yes", checkpoint_path="x"), TypeError, "resume must be True or False"),
    (lambda: GPTConfig(n_layer=True), TypeError, "GPTConfig.n_layer must be an int"),
    (lambda: GPTConfig(vocab_size=48.0), TypeError, "GPTConfig.vocab_size must be an int"),
    (lambda: GPTConfig(dropout=1.0), ValueError, r"GPTConfig.dropout must be in \[0, 1\)"),
    (lambda: GPTConfig(pos_init_std=float("nan")), ValueError, "GPTConfig.pos_init_std must be a finite number"),
    (lambda: _tiny()(torch.tensor([[1, 99]])), ValueError, r"token ids must be in 0..47, got 1..99"),
    (lambda: _tiny()(torch.tensor([[1, -1]])), ValueError, "token ids must be in 0..47"),
    (lambda: _tiny()(torch.tensor([[1.0, 2.0]])), TypeError, "token ids must be a .* int64 or int32"),
    (lambda: _tiny()([[1, 2]]), TypeError, "token ids must be a"),
    (lambda: _tiny().generate([[1, 2.5]], 3), TypeError, r"prompts\[0\]\[1\] must be an int, got 2.5"),
    (lambda: _tiny().generate([[1, 99]], 3), ValueError, r"prompts\[0\]\[1\] must be an int in 0..47"),
    (lambda: _tiny().generate([[1, 2]], 3, temperature=float("nan")), ValueError, "temperature must be a finite"),
    (lambda: train_batches(Task("add", 1), Tokenizer(), 0, 0), ValueError, "batch_size must be an int in 1.."),
    (lambda: train_batches(Task("add", 1), Tokenizer(), 4, 0.5), TypeError, "seed must be an int"),
    (lambda: encode_batch([], Tokenizer()), ValueError, "at least one problem"),
    (lambda: Tokenizer().decode([5, 2.7]), TypeError, r"token ids must be ints, got 2.7 \(float\)"),
    (lambda: evaluate_ranks(_lora_model(), Task("add", 1), 4), TypeError, "ranks must be a list of ints, got 4"),
    (lambda: evaluate_ranks(_lora_model(), Task("add", 1), [1.5]), TypeError, r"ranks\[0\] must be an int"),
    (lambda: train(_tiny(), sft_loss, lambda step: None, {"steps": 3}), TypeError, "config must be a TrainConfig"),
    (lambda: FinetuneConfig(task="div"), ValueError, "task must be one of 'add', 'sub', 'mul', 'wordprob', got 'div'"),
]


def _lora_model():
    m = _tiny()
    add_adapters(m, lambda lin: LoRALinear(lin, 2, 4))
    return m


@pytest.mark.parametrize("call,error,message", API_ROWS, ids=[str(i) for i in range(len(API_ROWS))])
def test_bad_api_call(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_numpy_ints_are_ints():
    """A numpy int is as good as a Python int, and gives the same layer."""
    a = LoRALinear(_lin(), np.int64(4), 8)
    b = LoRALinear(_lin(), 4, 8)
    assert a.r == 4 and type(a.r) is int and a.adapter_config() == b.adapter_config()
    a.set_rank(np.int32(2))
    assert a.rank == 2 and type(a.rank) is int
    d = DyLoRALinear(_lin(), 4, 8, ranks=np.array([1, 2]))
    assert d.ranks == [1, 2] and all(type(r) is int for r in d.ranks)
    cfg = FinetuneConfig(rank=np.int64(4), eval_ranks=np.array([1, 4]))
    assert cfg.rank == 4 and cfg.eval_ranks == (1, 4)


def test_scale_none_records_no_alpha():
    cfg = FinetuneConfig(scale="none")
    assert cfg.alpha is None  # c(r) = 1 reads no alpha: nothing is recorded that was not used


def test_data_file_and_model_api_errors(files):
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_problems(files["latin1"])
    with pytest.raises(ValueError, match="long.jsonl:1: .*block_size=64"):
        load_problems(files["long"], block_size=64)
    with pytest.raises(ValueError, match="60 token ids, the tokenizer has 48"):
        load_model(files["vocab"])
    model, _ = load_model(files["vocab"], vocab_size=None)  # on purpose: any vocabulary
    assert model.config.vocab_size == 60
    m = _tiny()
    add_adapters(m, lambda lin: LoRALinear(lin, 2, 4))
    with pytest.raises(TypeError, match="check_base must be True or False"):
        load_adapters(m, files["ad"], check_base="no")


# ----- files: permissions, temporaries, failures ----------------------------------
def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "new.json", {"a": 1})
        with open(tmp_path / "plain.txt", "w"):
            pass
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
        (tmp_path / "shared.pt").write_bytes(b"")
        os.chmod(tmp_path / "shared.pt", 0o644)
        atomic_save({"x": 1}, tmp_path / "shared.pt")  # overwriting keeps the file's permissions, as open() does
        assert (tmp_path / "shared.pt").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_links_and_pipes_are_written_as_open_would(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    os.symlink(real, tmp_path / "link.json")
    write_json(tmp_path / "link.json", {"a": 1})  # through the link: the link stays a link
    assert (tmp_path / "link.json").is_symlink() and json.loads(real.read_text()) == {"a": 1}
    fifo = tmp_path / "pipe"  # like --metrics-out /dev/stdout: written in place, never renamed over
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    write_json(fifo, {"b": 2})
    reader.join(10)
    assert json.loads(got[0]) == {"b": 2} and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_out_of_memory_is_one_line_and_a_bug_keeps_its_traceback(files, monkeypatch, capsys):
    def huge(cfg):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(cli, "pretrain", huge)
    rc, err = _run_cli(_argv("pretrain --n-embd 100000", files), capsys)
    assert rc == 2 and err.startswith("error: out of memory (") and err.count("\n") == 1, err

    def bug(cfg):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(cli, "pretrain", bug)
    with pytest.raises(RuntimeError, match="shapes"):
        cli.main(_argv("pretrain", files))


def test_a_save_killed_half_way_loses_nothing(tmp_path):
    target = tmp_path / "ck.pt"
    atomic_save({"step": 1, "w": torch.arange(1000.0)}, target)
    ready_r, ready_w = os.pipe()
    pid = os.fork()  # a child process that dies by SIGKILL in the middle of the second save
    if pid == 0:
        try:
            with atomic_write(target, "wb") as f:
                f.write(b"PK half a checkpoint")
                f.flush()
                os.write(ready_w, b"x")
                time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_w)  # so a child that died early shows as end-of-file here, not as a hang
    try:
        assert os.read(ready_r, 1) == b"x"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    ck = safe_load(target)  # the last complete save, whole
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.arange(1000.0))
    stale = list(tmp_path.glob(".ck.pt.tmp-*"))
    assert len(stale) == 1 and stale[0].name.startswith(f".ck.pt.tmp-{pid}-")  # recognisable
    alive = tmp_path / f".ck.pt.tmp-{os.getppid()}-beef"  # a live process's temporary: not ours to remove
    alive.write_bytes(b"")
    atomic_save({"step": 2}, target)  # the next save of the same target cleans up the dead one's
    assert safe_load(target)["step"] == 2
    assert sorted(tmp_path.iterdir()) == sorted([target, alive])


def test_a_full_disk_is_one_error_naming_the_file(tmp_path, monkeypatch, capsys):
    target = tmp_path / "ck.pt"
    atomic_save({"step": 1}, target)

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        atomic_save({"step": 2}, target)
    assert safe_load(target)["step"] == 1 and list(tmp_path.iterdir()) == [target]
    # and on the command line: one line, exit 2
    data = tmp_path / "data"
    rc, err = _run_cli(["data", "--out", str(data), "--device", "cpu"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err and str(data) in err, err


# ----- training faults ---------------------------------------------------------
def _train(model, steps, loss_fn=sft_loss, batch_size=8, data_seed=0, **kw):
    cfg = TrainConfig(steps=steps, lr=1e-3, progress=False, **kw)
    return train(model, loss_fn, train_batches(Task("add", 1), Tokenizer(), batch_size, data_seed), cfg)


def test_non_finite_weights_are_never_saved(tmp_path):
    ck = tmp_path / "ck.pt"
    m = _tiny()
    calls = {"n": 0}

    def poisoned(model, batch):  # a finite loss whose gradient is NaN at the 4th step (step 3)
        loss, metrics = sft_loss(model, batch)
        calls["n"] += 1
        if calls["n"] == 4:
            model.wte.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        return loss, metrics

    with pytest.raises(FloatingPointError, match=rf"wte.weight became non-finite .* at step 3; .*without saving it; "
                                                 rf"the last good checkpoint is {ck} \(step 3\)"):
        _train(m, 10, poisoned, checkpoint_path=str(ck), checkpoint_every=1)
    saved = safe_load(ck)
    assert saved["step"] == 3 and all(torch.isfinite(t).all() for t in saved["model"].values())
    assert not torch.isfinite(m.wte.weight).all()  # the model did break
    with pytest.raises(FloatingPointError, match="not saving .*holds non-finite"):
        save_model(m, tmp_path / "broken.pt")
    assert not (tmp_path / "broken.pt").exists()


def test_nan_loss_names_the_checkpoint_that_really_is_good(tmp_path):
    ck = tmp_path / "ck.pt"

    def nan_at_7(model, batch, calls={"n": 0}):
        loss, metrics = sft_loss(model, batch)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] > 7 else loss), metrics

    with pytest.raises(FloatingPointError, match=rf"nan at step 7.*{ck} \(step 5\)"):
        _train(_tiny(), 20, nan_at_7, checkpoint_path=str(ck), checkpoint_every=5)
    # a run that saved nothing does not name a file from some earlier run
    ck2 = tmp_path / "old.pt"
    ck2.write_bytes(b"an old file")
    with pytest.raises(FloatingPointError, match="no checkpoint of this run was saved"):
        _train(_tiny(), 20, lambda m, b: (sft_loss(m, b)[0] * math.nan, {}), checkpoint_path=str(ck2),
               checkpoint_every=5)


def _crash_after(n):
    calls = {"n": 0}

    def loss_fn(model, batch):
        if calls["n"] == n:
            raise KeyboardInterrupt  # a killed job
        calls["n"] += 1
        return sft_loss(model, batch)
    return lambda m, b: loss_fn(m, b)


@pytest.mark.parametrize("change,message", [({"batch_size": 16}, "batch_size"), ({"data_seed": 1}, "'seed': 1"),
                                            ({"seed": 3}, "seed=0 \\(now 3\\)")])
def test_resume_refuses_another_data_stream(tmp_path, change, message):
    ck = str(tmp_path / "ck.pt")
    with pytest.raises(KeyboardInterrupt):
        _train(_tiny(), 6, _crash_after(3), checkpoint_path=ck, checkpoint_every=1)
    kw = {"batch_size": 8, "data_seed": 0, "seed": 0, **change}
    with pytest.raises(ValueError, match=f"written with other settings: .*{message}"):
        _train(_tiny(), 6, batch_size=kw["batch_size"], data_seed=kw["data_seed"], seed=kw["seed"],
               checkpoint_path=ck, resume=True)
    res = _train(_tiny(), 6, checkpoint_path=ck, resume=True)  # the same settings resume
    assert res.steps == 6 and len(res.losses) == 3
