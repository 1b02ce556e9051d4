"""GraLoRA: Granular Low-Rank Adaptation (Jung et al. 2025, arXiv 2505.20355).

LoRA gives the whole (out x in) weight one rank-r update ``s B A``. GraLoRA
cuts W into a k x k grid of contiguous blocks (output block i, input block
j) and gives every block its own adapter of rank r/k:

    dW[i, j] = s * B_ij A_ij      A_ij: (r/k, in/k),  B_ij: (out/k, r/k)
    y_i = W_i x + b_i + s * sum_j B_ij A_ij x_j      (x_j: input block j)

Parameters: k^2 blocks * (r/k) * (in/k + out/k) = r (in + out), exactly
LoRA's at rank r, and the same FLOPs. But dW is a k x k grid of rank-r/k
blocks, so its rank can reach k r instead of r. k = 1 is LoRA.

Why it helps (the paper's "gradient entanglement"): with G = dL/dW, LoRA's
dL/dB = s G A^T mixes every input channel into every column of B, so one
input channel with outlier activations steers the whole update. In GraLoRA
dL/dB_ij = s G_ij A_ij^T sees only block (i, j) of G: the outlier moves
only the k blocks of input block j (and their A_ij), the rest learn as if it
were not there. Rule of thumb from the paper: pick k so that r / k^2 is
about 8 (k = 2 for r = 32, k = 4 for r = 128); larger k leaves each block a
rank r/k too small to learn its part.

Hybrid GraLoRA adds a plain LoRA branch of rank ``hybrid_r`` over the whole
matrix, at the same scale: dW += s * hybrid_B hybrid_A. It gives back some
global (non-block) capacity at small r, where r/k is tiny.

Scale: ``s = alpha / (r + hybrid_r)``, HF PEFT's rule, which is the shared
``lora_scale`` rule "lora" at the total rank r + hybrid_r; the other rules
("rslora": alpha / sqrt(r + hybrid_r), "none": 1) are there as for LoRA.

Storage, HF PEFT's layout so that weights exchange one to one:
    gralora_A (k, in/k, r):  gralora_A[j][:, i*r/k:(i+1)*r/k] = A_ij^T
    gralora_B (k, r, out/k): gralora_B[i][j*r/k:(j+1)*r/k]    = B_ij^T
    hybrid_A (hybrid_r, in), hybrid_B (out, hybrid_r)   (PEFT: gralora_A_general.weight, gralora_B_general.weight)
``block_delta(i, j)`` reads one block's factors out of that layout; the
forward and ``delta_weight`` do all blocks at once with einsum / bmm.

Init: each input block's (r, in/k) slab of A kaiming-uniform (entries within
1/sqrt(in/k)), hybrid_A kaiming-uniform, both B's zero: the adapted layer
starts out equal to the base layer. Merge: W <- W + dW; unmerge subtracts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .adapters import AdapterLayer, option
from .lora import lora_scale


@dataclass
class GraLoRAOptions:
    """GraLoRA's own settings (besides rank, alpha and scale)."""
    k: int = option(2, "blocks per side of the k x k grid; rank and layer sizes must be divisible by it "
                       "(rule of thumb: rank / k^2 about 8)", flag="--gralora-k")
    hybrid_r: int = option(0, "rank of a plain LoRA branch added to the blocks (hybrid GraLoRA); "
                              "trainable parameters grow to (rank + hybrid_r)(in + out)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_gralora(base: nn.Linear, r, k, hybrid_r) -> None:
    """Every setting GraLoRA needs, checked before the base layer is touched."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"adapters wrap nn.Linear layers, got {type(base).__name__}")
    n_in, n_out = base.in_features, base.out_features
    if not _is_int(k) or k < 1:
        raise ValueError(f"GraLoRA k (blocks per side) must be an int >= 1, got {k!r}")
    if not _is_int(r) or r < 1:
        raise ValueError(f"GraLoRA rank r must be an int >= 1, got {r!r}")
    if not _is_int(hybrid_r) or hybrid_r < 0:
        raise ValueError(f"GraLoRA hybrid_r must be an int >= 0, got {hybrid_r!r}")
    if r % k:
        raise ValueError(f"GraLoRA needs r divisible by k (each block gets rank r/k), got r={r}, k={k}")
    if n_in % k or n_out % k:
        raise ValueError(f"GraLoRA needs in and out features divisible by k, got a {n_in}->{n_out} layer "
                         f"and k={k}")
    if hybrid_r > min(n_in, n_out):
        raise ValueError(f"GraLoRA hybrid_r must be at most min(in, out) = {min(n_in, n_out)}, got {hybrid_r}")


class GraLoRALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, r: int, alpha: float, k: int, hybrid_r: int = 0, dropout: float = 0.0,
                 scale: str = "lora"):
        check_gralora(base, r, k, hybrid_r)  # before super().__init__ freezes the base layer
        lora_scale(r + hybrid_r, alpha, scale)  # rejects an unknown rule now
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__(base)
        self.r, self.k, self.hybrid_r = r, k, hybrid_r  # total block rank, blocks per side, hybrid rank
        self.alpha = float(alpha)
        self.scale_rule = scale
        n_in, n_out = base.in_features // k, base.out_features // k
        w = base.weight
        # one (r, in/k) slab per input block, each kaiming-uniform on its own fan-in (in/k), as PEFT draws them
        slabs = [nn.init.kaiming_uniform_(torch.empty(r, n_in, device=w.device, dtype=w.dtype), a=math.sqrt(5))
                 for _ in range(k)]
        self.gralora_A = nn.Parameter(torch.stack(slabs).transpose(1, 2).contiguous())  # (k, in/k, r)
        self.gralora_B = nn.Parameter(torch.zeros(k, r, n_out, device=w.device, dtype=w.dtype))  # (k, r, out/k)
        if hybrid_r:
            self.hybrid_A = nn.Parameter(torch.empty(hybrid_r, base.in_features, device=w.device, dtype=w.dtype))
            self.hybrid_B = nn.Parameter(torch.zeros(base.out_features, hybrid_r, device=w.device, dtype=w.dtype))
            nn.init.kaiming_uniform_(self.hybrid_A, a=math.sqrt(5))
        else:
            self.hybrid_A = self.hybrid_B = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.r}, k={self.k}, hybrid_r={self.hybrid_r}, alpha={self.alpha}, scale={self.scale_rule!r}"

    def adapter_config(self) -> dict:
        return {**super().adapter_config(), "r": self.r, "alpha": self.alpha, "k": self.k, "hybrid_r": self.hybrid_r,
                "scale": self.scale_rule}

    @property
    def scaling(self) -> float:
        """s = c(r + hybrid_r): alpha / (r + hybrid_r) with the default rule."""
        return lora_scale(self.r + self.hybrid_r, self.alpha, self.scale_rule)

    def block_delta(self, i: int, j: int) -> torch.Tensor:
        """Block (i, j) of the GraLoRA part of dW: s * B_ij A_ij, (out/k, in/k).
        The per-block reference the vectorised code is tested against."""
        q = self.r // self.k  # each block's rank
        A_ij = self.gralora_A[j][:, i * q:(i + 1) * q].T  # (r/k, in/k)
        B_ij = self.gralora_B[i][j * q:(j + 1) * q].T  # (out/k, r/k)
        return self.scaling * B_ij @ A_ij

    def _blocks(self):
        """The factors as (A4, B4): A4[j, c, i, q] = A_ij[q, c], B4[i, j, q, o] = B_ij[o, q]."""
        k, q = self.k, self.r // self.k
        A4 = self.gralora_A.unflatten(2, (k, q))  # (k_j, in/k, k_i, r/k)
        B4 = self.gralora_B.unflatten(1, (k, q))  # (k_i, k_j, r/k, out/k)
        return A4, B4

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        A4, B4 = self._blocks()
        # dW[i, o, j, c] = s * sum_q B_ij[o, q] A_ij[q, c]: every block at once
        dW = torch.einsum("ijqo,jciq->iojc", B4, A4).reshape(self.out_features, self.in_features)
        if self.hybrid_r:
            dW = dW + self.hybrid_B @ self.hybrid_A
        return self.scaling * dW

    def adapter_output(self, x, y):
        """The readable forward (plain autograd; used with dropout)."""
        A4, B4 = self._blocks()
        x = self.dropout(x)
        xb = x.unflatten(-1, (self.k, -1))  # (..., k_j, in/k): the input blocks x_j
        h = torch.einsum("...jc,jciq->...jiq", xb, A4)  # (..., k_j, k_i, r/k): A_ij x_j for every block
        z = torch.einsum("...jiq,ijqo->...io", h, B4)  # (..., k_i, out/k): sum_j B_ij A_ij x_j
        out = z.flatten(-2)  # (..., out)
        if self.hybrid_r:
            out = out + (x @ self.hybrid_A.T) @ self.hybrid_B.T
        return y + self.scaling * out

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)
        if isinstance(self.dropout, nn.Dropout) and self.training:
            return super().forward(x)  # the adapter reads dropout(x): plain autograd
        return gralora_linear(x, self.base.weight, self.base.bias, self.gralora_A, self.gralora_B,
                              self.hybrid_A, self.hybrid_B, self.scaling)


class _GraLoRALinearFn(torch.autograd.Function):
    """y = x W^T + bias + s * (GraLoRA(x) + x hA^T hB^T), backward by hand.

    Same result as ``base(x) + adapter_output(x, base(x))``, written out for
    speed, as ``lora.py`` does for LoRA: the adapter's input gradient lands
    in the base one in place, and every product is one batched matmul over
    the k blocks. With N tokens, x2 (N, in), g = dL/dy (N, out), and
        xb (k_j, N, in/k)   the input blocks       gb (k_i, N, out/k)  the output-gradient blocks
        h  (k_j, N, r)      s * x_j A_j            hp (k_i, N, r)      h regrouped by output block
    the forward is y_i += hp_i B_i and the backward
        dL/dB_i = hp_i^T gb_i          ghp_i = s * gb_i B_i^T  (regrouped by input block: gh_j)
        dL/dA_j = xb_j^T gh_j          dL/dx_j += gh_j A_j^T
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, hA, hB, s):
        k, n_in, r = A.shape
        n_out, q = B.shape[2], r // k
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        N = x2.shape[0]
        xb = x2.view(N, k, n_in).transpose(0, 1)  # (k_j, N, in/k), a strided view
        h = torch.bmm(xb, A).mul_(s)  # (k_j, N, r): columns grouped by output block i
        hp = h.view(k, N, k, q).permute(2, 1, 0, 3).reshape(k, N, r)  # (k_i, N, r): columns grouped by j
        y = x.new_empty(*x.shape[:-1], W.shape[0])  # (..., out), a fresh tensor
        y2 = y.view(N, -1)  # (N, out)
        if bias is None:
            torch.mm(x2, W.t(), out=y2)
        else:
            torch.addmm(bias, x2, W.t(), out=y2)
        y2.view(N, k, n_out).transpose(0, 1).baddbmm_(hp, B)  # y_i += hp_i B_i, in place through a strided view
        hh = None
        if hA is not None:
            hh = (x2 @ hA.t()).mul_(s)  # (N, hybrid_r)
            y2.addmm_(hh, hB.t())
        ctx.save_for_backward(x2, W, A, B, hp, hA, hB, hh)
        ctx.s, ctx.x_shape = s, x.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, W, A, B, hp, hA, hB, hh = ctx.saved_tensors
        s = ctx.s
        k, n_in, r = A.shape
        n_out, q = B.shape[2], r // k
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        N = g.shape[0]
        gb = g.view(N, k, n_out).transpose(0, 1)  # (k_i, N, out/k)
        ghp = torch.bmm(gb, B.transpose(1, 2)).mul_(s)  # (k_i, N, r)
        gh = ghp.view(k, N, k, q).permute(2, 1, 0, 3).reshape(k, N, r)  # (k_j, N, r)
        ghh = (g @ hB).mul_(s) if hA is not None else None  # (N, hybrid_r)
        gx = gW = gb_ = gA = gB = ghA = ghB = None
        if ctx.needs_input_grad[0]:
            gx = g @ W  # (N, in)
            gx.view(N, k, n_in).transpose(0, 1).baddbmm_(gh, A.transpose(1, 2))  # gx_j += gh_j A_j^T
            if ghh is not None:
                gx.addmm_(ghh, hA)
            gx = gx.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gW = g.t() @ x2
        if ctx.needs_input_grad[2]:
            gb_ = g.sum(0)
        if ctx.needs_input_grad[3]:
            gA = torch.bmm(x2.view(N, k, n_in).permute(1, 2, 0), gh)  # (k_j, in/k, r)
        if ctx.needs_input_grad[4]:
            gB = torch.bmm(hp.transpose(1, 2), gb)  # (k_i, r, out/k)
        if ctx.needs_input_grad[5]:
            ghA = ghh.t() @ x2  # (hybrid_r, in)
        if ctx.needs_input_grad[6]:
            ghB = (hh.t() @ g).t()  # (out, hybrid_r)
        return gx, gW, gb_, gA, gB, ghA, ghB, None


def gralora_linear(x, W, bias, A, B, hA, hB, s: float):
    """``x W^T + bias + s * (sum_j B_ij A_ij x_j per output block i + hB hA x)``
    with A (k, in/k, r) and B (k, r, out/k) in PEFT's layout; hA, hB may be None."""
    return _GraLoRALinearFn.apply(x, W, bias, A, B, hA, hB, s)
