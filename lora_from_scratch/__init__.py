"""lora_from_scratch: readable LoRA variants on a tiny GPT that learns toy arithmetic.

The public names, imported here from the file that defines each of them;
every file opens with an explanation of its part.
"""

from .adapters import (AdapterLayer, adapter_layers, adapters_disabled, add_adapters, load_adapters,
                       merge_adapters, save_adapters, trainable_parameters, unmerge_adapters)
from .checkpoint import load_model, save_model
from .data import encode_batch, load_problems, save_problems, train_batches
from .grpo import (GRPOConfig, GRPOObjective, Rollouts, group_advantages, grpo_loss, k3_kl, rl_batches,
                   sample_rollouts, token_logprobs)
from .dylora import DyLoRALinear, DyLoRAOptions, with_rank_sampling
from .gralora import GraLoRALinear, GraLoRAOptions
from .lora import LoRALinear, evaluate_ranks, lora_scale, set_adapter_rank
from .matryoshka import MatryoshkaLoRALinear, MatryoshkaOptions, aurac, matryoshka_P
from .mixlora import MixLoRALinear, MixLoRAOptions, with_balance_loss
from .methods import METHODS, AdapterMethod, get_method
from .mixture import effective_support_size
from .remix import ReMixLinear, ReMixOptions, rloo_loss
from .rl import ALGOS, RLConfig, rl_finetune
from .model import GPTConfig, KVCache, TinyGPT
from .tasks import TASKS, Problem, Task
from .tokenizer import Tokenizer
from .train import TrainConfig, evaluate, predict, sft_loss, train

__version__ = "0.1.0"
