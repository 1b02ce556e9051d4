"""TinyGPT: a small decoder-only transformer with a KV cache.

The architecture is GPT-2's, shrunk: token + learned position embeddings,
``n_layer`` pre-LayerNorm blocks (attention, then an MLP, each added to the
residual stream), a final LayerNorm, and an output layer that reuses the
token embedding matrix (weight tying). Every linear layer has its own name,
``q_proj k_proj v_proj o_proj up_proj down_proj``, so adapters can target
them by name, as HF PEFT does with real models.

Shapes: B batch, T new tokens, S = past + T keys, C = n_embd, H heads,
D = C // H per head.

Left padding. Batched generation needs every prompt's last token in the same
column, so shorter prompts are padded on the left. ``attention_mask`` (B, S)
marks real tokens with 1. Positions count real tokens only, so a prompt gets
the same positions whatever its padding, and no real token attends to a pad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 48  # number of token ids (Tokenizer().vocab_size)
    block_size: int = 128  # longest sequence the position table covers
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 64  # width of the residual stream
    dropout: float = 0.0  # dropout on attention output and MLP output
    bias: bool = True  # biases in the linear layers
    pos_init_std: float = 0.1  # init std of the position embeddings (GPT-2: 0.02; see TinyGPT.__init__)
    pad_id: int = 0  # id written after a row's <eos> during generation
    eos_id: int = 2  # generation stops a row when it writes this id

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


class KVCache:
    """Keys and values of every layer for the tokens seen so far.

    ``k[l]``, ``v[l]``: (B, H, max_len, D), filled up to ``length``. Writing
    in place into preallocated tensors avoids a ``torch.cat`` per token.
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device=None, dtype=None):
        shape = (batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0  # tokens already stored
        self.max_len = max_len


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(C, C, bias=cfg.bias)
        self.k_proj = nn.Linear(C, C, bias=cfg.bias)
        self.v_proj = nn.Linear(C, C, bias=cfg.bias)
        self.o_proj = nn.Linear(C, C, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        H = self.n_head

        def heads(t):  # (B, T, C) -> (B, H, T, D)
            return t.view(B, T, H, C // H).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None:  # append this step's keys/values, attend over all
            start, end = cache.length, cache.length + T
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        # mask is None means "plain causal, nothing padded" (TinyGPT.forward
        # only passes None when queries and keys start at the same position,
        # or when a single new token may see every key)
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.down_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, cache=None, layer=0):
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache, layer))
        return x + self.drop(self.mlp(self.ln_2(x)))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        # GPT-2 init: small normal weights; the projections that write into the
        # residual stream are scaled down by sqrt(2 * n_layer) so the stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
        # One change from GPT-2: larger position embeddings at init. Arithmetic
        # is positional (the tens digit of the answer must attend to the tens
        # digits of the operands), and with 0.02 positions start out nearly
        # alike, so some runs sit for hundreds of steps with one answer digit
        # wrong. benchmarks/pretrain_speed.py --pos-init-std 0.02 shows it.
        nn.init.normal_(self.wpe.weight, 0.0, cfg.pos_init_std)

    def forward(self, idx, attention_mask=None, cache: KVCache | None = None):
        """Logits (B, T, vocab) for tokens ``idx`` (B, T).

        ``attention_mask`` (B, S) covers the cached tokens and the new ones
        (S = past + T); None means no padding anywhere. With ``cache`` the new
        tokens attend to everything stored before them.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        S = past + T
        if S > self.config.block_size:
            raise ValueError(f"sequence of {S} tokens is longer than block_size={self.config.block_size}")
        if cache is not None and S > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens, {S} needed")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must be (B, past + T) = {(B, S)}, got {tuple(attention_mask.shape)}")
        if attention_mask is None and past > 0 and T > 1:  # a chunk after a cache needs the offset mask
            attention_mask = torch.ones(B, S, dtype=torch.long, device=idx.device)
        elif attention_mask is not None and (past == 0 or T == 1) and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: take the fast causal path
        if attention_mask is None:
            pos = torch.arange(past, S, device=idx.device).expand(B, T)
            mask = None
        else:
            keep = attention_mask.bool()
            pos = (keep.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)
            # query t (absolute past + t) sees key s if s <= past + t and s is
            # real; every query also sees itself, so a pad row is never empty
            q_abs = torch.arange(past, S, device=idx.device)[:, None]  # (T, 1)
            k_abs = torch.arange(S, device=idx.device)[None, :]  # (1, S)
            mask = (k_abs <= q_abs) & keep[:, None, :]  # (B, T, S)
            mask = (mask | (k_abs == q_abs))[:, None]  # (B, 1, T, S)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer)
        if cache is not None:
            cache.length = S
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, vocab), tied

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 attention_mask=None, use_cache: bool = True, generator: torch.Generator | None = None,
                 return_logprobs: bool = False):
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        ``prompts``: a list of token-id lists of any lengths (left-padded
        here), or a (B, T) tensor with an optional ``attention_mask``.
        Greedy picks the most likely token; otherwise tokens are sampled from
        softmax(logits / temperature). A row stops at <eos>; later positions
        hold ``pad_id``. Returns the new tokens, (B, n) with n <= max_new_tokens.
        ``use_cache=False`` recomputes the whole sequence at each step: slower,
        and the reference the cache is tested against. ``return_logprobs``
        also returns (B, n) log-probs of the chosen tokens under
        softmax(logits / temperature), 0 after a row's <eos> (RL keeps them
        as the old policy's log-probs).
        """
        cfg = self.config
        device = self.wte.weight.device
        if isinstance(prompts, torch.Tensor):
            ids = prompts.to(device)
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
        else:
            if not prompts or any(len(p) == 0 for p in prompts):
                raise ValueError("generate needs at least one prompt, and every prompt at least one token")
            T0 = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), T0), cfg.pad_id, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, T0 - len(p):] = torch.as_tensor(p, device=device)
                mask[i, T0 - len(p):] = 1
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__") or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")  # numpy ints are fine
        max_new_tokens = int(max_new_tokens)
        if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"prompts must be (B, T) with an attention_mask of the same shape, got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        if ids.shape[1] + max_new_tokens - 1 > cfg.block_size:
            raise ValueError(f"a {ids.shape[1]}-token prompt plus {max_new_tokens} new tokens does not fit "
                             f"block_size={cfg.block_size}")
        if not bool(mask[:, -1].all()):
            raise ValueError("prompts must be left-padded: the last column of attention_mask must be all 1")
        B = ids.shape[0]
        cache = KVCache(cfg, B, ids.shape[1] + max_new_tokens, device, self.wte.weight.dtype) if use_cache else None
        was_training = self.training
        self.eval()
        try:
            logits = self(ids, mask, cache)[:, -1]  # prefill: the whole prompt at once
            done = torch.zeros(B, dtype=torch.bool, device=device)
            out, logps = [], []
            for step in range(max_new_tokens):
                if greedy:
                    nxt = logits.argmax(-1)
                else:
                    probs = F.softmax(logits.float() / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                if return_logprobs:
                    lp = F.log_softmax(logits.float() / temperature, -1).gather(1, nxt[:, None]).squeeze(1)
                    logps.append(lp.masked_fill(done, 0.0))
                nxt = nxt.masked_fill(done, cfg.pad_id)  # finished rows write pads
                out.append(nxt)
                done = done | (nxt == cfg.eos_id)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                if cache is not None:  # feed only the new token
                    logits = self(nxt[:, None], mask, cache)[:, -1]
                else:  # recompute everything from scratch
                    ids = torch.cat([ids, nxt[:, None]], 1)
                    logits = self(ids, mask)[:, -1]
        finally:
            self.train(was_training)
        if return_logprobs:
            return torch.stack(out, 1), torch.stack(logps, 1)
        return torch.stack(out, 1)
