"""Solutions to the exercises of tutorials/04_gralora.md.

tests/test_exercises.py runs the tutorial's checks against these functions.
"""

import math

import torch


def dense_delta(A, B, s):
    """dW (out, in) from GraLoRA factors in PEFT's layout, A (k, in/k, r) and
    B (k, r, out/k), one block at a time."""
    k, n_in, r = A.shape
    n_out, q = B.shape[2], r // k
    dW = torch.zeros(k * n_out, k * n_in, dtype=A.dtype)
    for i in range(k):  # output block
        for j in range(k):  # input block
            A_ij = A[j][:, i * q:(i + 1) * q].T  # (r/k, in/k)
            B_ij = B[i][j * q:(j + 1) * q].T  # (out/k, r/k)
            dW[i * n_out:(i + 1) * n_out, j * n_in:(j + 1) * n_in] = s * B_ij @ A_ij
    return dW


def as_lora(layer):
    """(A_big (k r, in), B_big (out, k r)) with s * B_big @ A_big equal to the
    GraLoRA update: each of the k^2 blocks contributes r/k rows of A_big
    (zero outside its input block) and r/k columns of B_big (zero outside its
    output block). So the update is a LoRA of rank k r, with a block pattern."""
    k, q = layer.k, layer.r // layer.k
    n_in, n_out = layer.in_features // k, layer.out_features // k
    A_big = torch.zeros(k * layer.r, layer.in_features)
    B_big = torch.zeros(layer.out_features, k * layer.r)
    with torch.no_grad():
        for i in range(k):
            for j in range(k):
                rows = slice((i * k + j) * q, (i * k + j + 1) * q)  # this block's r/k components
                A_big[rows, j * n_in:(j + 1) * n_in] = layer.gralora_A[j][:, i * q:(i + 1) * q].T
                B_big[i * n_out:(i + 1) * n_out, rows] = layer.gralora_B[i][j * q:(j + 1) * q].T
    return A_big, B_big


def pick_k(r, in_features, out_features):
    """The k in {1, 2, 4, ...} that divides r, in and out and brings r / k^2
    closest to 8 on a log scale (a tie goes to the larger k)."""
    best = 1
    k = 2
    while k <= r:
        if r % k == 0 and in_features % k == 0 and out_features % k == 0:
            if abs(math.log2(r / k**2 / 8)) <= abs(math.log2(r / best**2 / 8)):
                best = k
        k *= 2
    return best
