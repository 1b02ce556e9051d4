import numpy as np
import pytest
import torch

from lora_from_scratch.model import GPTConfig, KVCache
from lora_from_scratch.tasks import Task


def test_named_projections_and_weight_tying(tiny_model):
    m = tiny_model()
    names = {n.rsplit(".", 1)[-1] for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    ids = torch.randint(3, 40, (2, 7))
    logits = m(ids)
    assert logits.shape == (2, 7, m.config.vocab_size)
    # the output layer is the token embedding: change it and the logits move
    with torch.no_grad():
        m.wte.weight[5] += 1.0
    assert not torch.allclose(m(ids)[..., 5], logits[..., 5])


def test_changing_a_future_token_never_changes_earlier_logits(tiny_model):
    m = tiny_model(n_layer=2).eval()
    ids = torch.randint(3, 40, (3, 12))
    base = m(ids)
    for t in range(12):
        other = ids.clone()
        other[:, t] = (other[:, t] + 1 - 3) % 37 + 3
        out = m(other)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-6)


def test_left_padding_does_not_change_a_rows_logits(tiny_model, tok):
    m = tiny_model(n_layer=2).eval()
    row = tok.encode("12+34=", bos=True)
    alone = m(torch.tensor([row]))
    padded = torch.tensor([[tok.pad_id] * 4 + row])
    mask = torch.tensor([[0] * 4 + [1] * len(row)])
    assert torch.allclose(m(padded, mask)[:, 4:], alone, atol=1e-5)


@pytest.mark.parametrize("n_layer", [1, 2])
def test_cached_generation_equals_full_recomputation(tiny_model, tok, n_layer):
    # train-free random weights give varied tokens; the prompts are ragged
    m = tiny_model(seed=3, n_layer=n_layer)
    probs = Task("wordprob", 2).test_set()[:6] + Task("add", 2).test_set()[:6]
    prompts = [tok.encode(p.prompt, bos=True) for p in probs]
    assert len({len(p) for p in prompts}) > 3
    cached = m.generate(prompts, 12, greedy=True)
    full = m.generate(prompts, 12, greedy=True, use_cache=False)
    assert torch.equal(cached, full)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(m.generate(prompts, 12, generator=g1), m.generate(prompts, 12, generator=g2, use_cache=False))
    # a prompt alone gives what it gives inside the ragged batch
    alone = m.generate([prompts[0]], 12, greedy=True)
    assert torch.equal(alone[0], cached[0, :alone.shape[1]])


def test_generation_stops_each_row_at_eos(tiny_model):
    m = tiny_model()
    eos = m.config.eos_id
    with torch.no_grad():  # make <eos> the argmax after token 7 only
        m.wte.weight.zero_()
        m.wte.weight[eos, 0] = 10.0
        m.wte.weight[7, 0] = 10.0
        m.wpe.weight.zero_()
        for p in m.blocks.parameters():
            p.zero_()
    out = m.generate([[1, 7], [1, 7, 7]], 5, greedy=True)
    assert out.shape[1] == 1  # every row wrote <eos> at once, so generation stopped
    assert (out[:, 0] == eos).all()


def test_generate_rejects_bad_input(tiny_model):
    m = tiny_model(block_size=16)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match="temperature"):
        m.generate([[1, 2]], 3, temperature=0.0)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_cache_prefill_then_step_matches_full_forward(tiny_model):
    m = tiny_model(n_layer=2).eval()
    ids = torch.randint(3, 40, (2, 9))
    full = m(ids)
    cache = KVCache(m.config, 2, 9)
    first = m(ids[:, :6], cache=cache)
    rest = [m(ids[:, t:t + 1], cache=cache) for t in range(6, 9)]
    assert torch.allclose(torch.cat([first] + rest, 1), full, atol=1e-5)


def test_chunked_prefill_after_a_cache_with_or_without_mask(tiny_model):
    m = tiny_model(n_layer=2).eval()
    ids = torch.randint(3, 40, (2, 9))
    full = m(ids)
    for mask in (None, torch.ones(2, 9, dtype=torch.long)):
        cache = KVCache(m.config, 2, 9)
        first = m(ids[:, :3], None if mask is None else mask[:, :3], cache=cache)
        second = m(ids[:, 3:], mask, cache=cache)  # six tokens after three cached ones
        assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, past \+ T\)"):
        m(ids, torch.ones(2, 99))


def test_generate_checks_lengths_and_padding_side(tiny_model):
    m = tiny_model(block_size=16)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        m.generate([[1, 2]], 0)
    with pytest.raises(ValueError, match="does not fit block_size=16"):
        m.generate([[1] * 10], 8)
    right_padded = torch.tensor([[1, 5, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        m.generate(right_padded, 2, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        m.generate([[1, 2]], 2.0)
    with pytest.raises(ValueError, match="attention_mask of the same shape"):
        m.generate(right_padded, 2, attention_mask=torch.ones(3))
    assert m.generate([[1, 2]], np.int64(3), greedy=True).shape[0] == 1  # any integer type will do
