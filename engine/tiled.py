"""Linear layers on the CPU as one batched product over tiles of output features (the CPU path).

A decode step multiplies a few dozen rows by each weight. For such short products MKL keeps to one core of this
project's two (at batch 4, 8 or 17 the second thread adds 0-15%), while a batched product over tiles of TILE
output features hands whole tiles to each thread: 25-50% less time for the blocks' products and about half for
the vocab projection with two threads, the same with one. Each output element is the same dot product over the
same inputs, and on this project's CPU the result is bitwise that of F.linear (tests/test_cpu_path.py checks it
to a tolerance). Long products (prefill chunks) already use every thread, and there the tiles cost a little: they
take F.linear.
"""
import torch
import torch.nn.functional as F

TILE = 128  # output features per tile: the best of 128/256/384 for gpt2's products at batch 1-64 on 2 threads
MAX_ROWS = 64  # above this the plain product (batch 256 ran up to 20% slower in tiles)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tile: int = TILE) -> torch.Tensor:
    """F.linear(x, weight, bias), over tiles of `tile` rows of weight when x is short and they divide it evenly."""
    (rows, width), features = x.shape, weight.shape[0]
    if rows > MAX_ROWS or features % tile:
        return F.linear(x, weight, bias)
    tiles = weight.view(features // tile, tile, width).transpose(1, 2)  # (T, K, tile), no copy
    x = x.expand(len(tiles), rows, width)
    if bias is None:
        out = torch.bmm(x, tiles)
    else:
        out = torch.baddbmm(bias.view(len(tiles), 1, tile), x, tiles)  # (T, rows, tile)
    return out.transpose(0, 1).reshape(rows, features)
