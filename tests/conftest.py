import pytest
import torch

from lora_from_scratch.model import GPTConfig, TinyGPT
from lora_from_scratch.tokenizer import Tokenizer


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from a second thread, and with other
    processes on the machine, busy-waiting threads slow them down many times."""
    torch.set_num_threads(1)


@pytest.fixture
def tok():
    return Tokenizer()


@pytest.fixture
def tiny_model():
    """A small random TinyGPT (1 layer, width 32)."""
    def make(seed=0, **kw):
        torch.manual_seed(seed)
        cfg = dict(vocab_size=Tokenizer().vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=128)
        cfg.update(kw)
        return TinyGPT(GPTConfig(**cfg))
    return make
