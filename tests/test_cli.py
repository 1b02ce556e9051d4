import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_from_scratch.__main__ import build_parser, main

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["data", "pretrain", "eval", "finetune", "demo", "rl"]
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))
SMALL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--quiet", "--device", "cpu"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--seed", "--device", "--metrics-out", "--threads"):
        assert flag in out


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "lora_from_scratch", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_help_of_every_benchmark(script):
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A 1-layer base pretrained through the CLI, with its metrics."""
    d = tmp_path_factory.mktemp("cli")
    ck, metrics = d / "base.pt", d / "metrics.json"
    rc = main(["pretrain", "--task", "add", "--digits", "1", "--steps", "30", "--batch-size", "32", *SMALL,
               "--out", str(ck), "--metrics-out", str(metrics)])
    assert rc == 0
    return ck, json.loads(metrics.read_text())


def test_smoke_pretrain_writes_valid_metrics(small_base):
    ck, m = small_base
    assert ck.exists()
    assert m["command"] == "pretrain" and m["steps"] == 30
    assert 0.0 <= m["test_exact_match"] <= 1.0 and m["seconds"] > 0
    assert m["task"] == {"name": "add", "digits": [1, 1], "reverse": True, "pad": True}


def test_eval_reads_the_task_from_the_checkpoint(small_base, tmp_path, capsys):
    ck, m = small_base
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(ck), "--quiet", "--device", "cpu", "--metrics-out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["test_exact_match"] == pytest.approx(m["test_exact_match"])
    assert "test exact-match" in capsys.readouterr().out


def test_eval_on_a_data_file(small_base, tmp_path):
    ck, _ = small_base
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+2=", "answer": "30"}\n')
    out = tmp_path / "e.json"
    assert main(["eval", "--ckpt", str(ck), "--data", str(data), "--device", "cpu", "--metrics-out", str(out)]) == 0
    assert json.loads(out.read_text())["test_exact_match"] in (0.0, 1.0)


@pytest.mark.parametrize("method", ["lora", "dylora", "matryoshka"])
def test_smoke_finetune_prints_rank_table(small_base, tmp_path, capsys, method):
    ck, _ = small_base
    out = tmp_path / "ft.json"
    rc = main(["finetune", "--method", method, "--rank", "4", "--task", "sub", "--digits", "1", "--steps", "5",
               "--batch-size", "16", "--base", str(ck), "--eval-ranks", "1,2,4", "--quiet", "--device", "cpu",
               "--metrics-out", str(out), "--save-adapters", str(tmp_path / "ad.pt")])
    assert rc == 0
    m = json.loads(out.read_text())
    assert set(m["exact_match_by_rank"]) == {"1", "2", "4"}
    assert m["trainable_parameters"] == 4 * 4 * (32 + 32) + 2 * 4 * (32 + 128)  # q k v o, up down
    assert m["steps"] == 5 and "aurac" in m
    assert "| rank | exact-match |" in capsys.readouterr().out
    assert (tmp_path / "ad.pt").exists()


@pytest.mark.parametrize("argv,message", [
    (["pretrain", "--digits", "9", "--steps", "1"], "digits must be between 1 and 6"),
    (["eval", "--ckpt", "does/not/exist.pt"], "no model checkpoint at does/not/exist.pt"),
    (["finetune", "--rank", "0", "--base", "{ck}", "--steps", "1"], "rank must be an int in 1..min(in, out) = 1..32"),
    (["finetune", "--targets", "qkv", "--base", "{ck}", "--steps", "1"], "match no nn.Linear"),
])
def test_bad_input_gives_a_clear_error(argv, message, small_base, capsys):
    ck, _ = small_base
    argv = [a.format(ck=ck) for a in argv] + ["--quiet", "--device", "cpu"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_corrupt_checkpoint_and_bad_task_name(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    assert main(["eval", "--ckpt", str(bad), "--task", "add"]) == 2
    assert "not a readable model checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse names the allowed choices
        build_parser().parse_args(["pretrain", "--task", "div"])
    assert e.value.code == 2
    assert "invalid choice: 'div'" in capsys.readouterr().err


def test_every_method_in_the_table_has_its_options_in_help(capsys):
    from lora_from_scratch.methods import METHODS, option_flags
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    for m in METHODS.values():
        assert m.name in out
        for _, flag, *_ in option_flags(m):
            assert flag in out


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--method", "lora", "--unfrozen"], "--unfrozen is an option of --method dylora, not of --method lora"),
    (["finetune", "--method", "lora", "--train-ranks", "1,2"], "--train-ranks is an option of --method dylora / matryoshka"),
    (["finetune", "--method", "dylora", "--train-ranks", "2,x"], "--train-ranks: expected comma-separated integers"),
])
def test_options_of_another_method_are_refused(argv, message, capsys):
    assert main(argv + ["--steps", "1", "--quiet", "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_finetune_config_refuses_unknown_options():
    from lora_from_scratch.recipes import FinetuneConfig
    with pytest.raises(ValueError, match=r"method 'lora' has no option\(s\) \['unfrozen'\]"):
        FinetuneConfig(method="lora", options={"unfrozen": True})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        FinetuneConfig(method="nope")


def test_smoke_rl_end_to_end(small_base, tmp_path, capsys):
    ck, _ = small_base
    out = tmp_path / "rl.json"
    rc = main(["rl", "--algo", "grpo", "--method", "lora", "--rank", "4", "--task", "add", "--digits", "1",
               "--base", str(ck), "--steps", "3", "--prompts", "4", "--group-size", "4", "--beta", "0.04",
               "--mu", "2", "--eval-every", "0", "--quiet", "--device", "cpu", "--metrics-out", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["command"] == "rl" and m["steps"] == 3 and len(m["per_step"]["reward"]) == 3
    for key in ("reward", "test_exact_match", "base_exact_match", "kl", "clip_frac", "length"):
        assert m[key] is not None and m[key] >= 0, key
    assert "test exact-match" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--group-size", "1"], "group_size must be an int >= 2"),
    (["--beta", "-1"], "beta must be >= 0"),
    (["--temperature", "0"], "temperature must be > 0"),
])
def test_rl_bad_settings_give_a_clear_error(argv, message, small_base, capsys):
    ck, _ = small_base
    assert main(["rl", "--base", str(ck), "--task", "add", "--digits", "1", "--quiet", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_threads_flag_sets_torch_threads_and_refuses_bad_counts(tmp_path, capsys):
    import torch
    try:
        assert main(["data", "--out", str(tmp_path), "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["data", "--out", str(tmp_path)]) == 0  # the default
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as e:
            main(["data", "--out", str(tmp_path), "--threads", bad])
        assert e.value.code == 2
        assert "--threads: expected a positive integer" in capsys.readouterr().err
