"""The fragment kernels' input operands (``fragment_inputs``): the words each lane reads for a
step, from the rows and from the copy in fragment order. Plain Triton, so CI runs it through the
interpreter; the kernels that take these words run on a GPU only (their PTX)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl
from triton_cases import DEVICE, NEEDS_TRITON

from fourbit.kernels.triton.fragment_inputs import InputPermute, permuted_inputs, row_inputs

pytestmark = NEEDS_TRITON


@triton.jit
def _step_inputs_kernel(x_ptr, permuted_ptr, out_ptr, M, stride_xm, k_stop, STEPS: tl.constexpr, TILES: tl.constexpr):
    """Each lane's eight input words of every step, read from the rows then from the permuted
    copy: ``out[s, form, word, lane]`` (form 0: ``row_inputs``, 1: ``permuted_inputs``)."""
    lane = tl.arange(0, 32)
    group = lane // 4
    quad = lane % 4
    for s in tl.static_range(STEPS):
        column = 64 * s + lane * 0  # as the kernels pass it: a tensor, not a constant
        rows = row_inputs(x_ptr, group, M, stride_xm, column // 4 + quad * 4, column < k_stop, TILES)
        copy = permuted_inputs(permuted_ptr, lane, column // 64, column < k_stop, TILES)
        for word in tl.static_range(8):
            tl.store(out_ptr + ((s * 2) * 8 + word) * 32 + lane, rows[word])
            tl.store(out_ptr + ((s * 2 + 1) * 8 + word) * 32 + lane, copy[word])


@pytest.mark.parametrize(("tiles", "m"), [(1, 1), (1, 8), (2, 11), (2, 16)])
def test_each_lane_reads_the_words_of_its_rows_and_columns_in_both_forms(tiles, m):
    """Lane l of a step s reads, for tile t, int64 words 16s + 4(l % 4) .. + 3 of input row
    8t + l // 4 (four 16-bit values each), zeros for rows from M and for steps from ``k_stop``;
    with one tile the second four words repeat the first; the copy in fragment order
    (``InputPermute``) gives each lane the same words."""
    steps, k = 3, 256
    torch.manual_seed(m)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
    words = x.view(torch.int64)  # (m, k / 4)
    permuted = InputPermute(tiles, k, torch.device(DEVICE))(x)
    out = torch.full((steps, 2, 8, 32), -1, dtype=torch.int64, device=DEVICE)
    k_stop = 128  # steps 0 and 1 live
    _step_inputs_kernel[(1,)](words, permuted, out, m, words.stride(0), k_stop, steps, tiles)
    expected = torch.zeros(steps, 8, 32, dtype=torch.int64)
    for s in range(2):
        for lane in range(32):
            for tile in range(tiles):
                row = 8 * tile + lane // 4
                if row < m:
                    first = 16 * s + 4 * (lane % 4)
                    expected[s, 4 * tile : 4 * tile + 4, lane] = words[row, first : first + 4].cpu()
            if tiles == 1:
                expected[s, 4:, lane] = expected[s, :4, lane]
    got = out.cpu()
    assert torch.equal(got[:, 0], expected)
    assert torch.equal(got[:, 1], expected)
    assert expected[:2].ne(0).sum() > 0  # the rows' words are there, not only zeros
