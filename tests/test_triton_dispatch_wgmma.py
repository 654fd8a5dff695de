"""The H200 tables' rules for Hopper's ``wgmma`` kernels (``dispatch.choose_config``,
``tuning.WgmmaRule``): which rows and weights run the few-row and wide kernels, in which programs
and clusters. The kernels' support and the multiprocessor count are forced (the
``h200_without_a_gpu`` fixture), so these run without a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import NEEDS_TRITON

from fourbit.kernels.triton import dispatch, tuning

pytestmark = NEEDS_TRITON


def test_the_h200_tables_take_weights_of_2_27_elements_and_more_to_1024_rows_on_the_wide_wgmma(h200_without_a_gpu):
    """Past 512 input rows only the largest weights keep the wide ``wgmma`` kernel (in blocks of
    rows): those of at least 2**27 elements (28672x8192 and 8192x28672, measured) up to 1024 rows;
    smaller weights (8192x8192, 28672x4096) and longer inputs go to decode + cuBLAS, and the
    Hopper tables (not measured there) keep 512 rows. (Support and the multiprocessor count are
    forced, so this runs without a GPU.)"""

    def chosen(rows: int, n: int, k: int, captured: bool = False) -> tuple | str:
        return dispatch.choose_config(torch.zeros(rows, k, dtype=torch.bfloat16), n, k, 64, captured=captured)

    for captured in (False, True):
        for n, k in ((28672, 8192), (8192, 28672), (16384, 8192)):  # the last: exactly 2**27
            assert [chosen(rows, n, k, captured)[0] for rows in (513, 768, 1024)] == ["wgmma_wide"] * 3
            assert chosen(1025, n, k, captured) == "chunked"
        for n, k in ((8192, 8192), (28672, 4096), (16384, 8192 - 256)):
            assert chosen(512, n, k, captured)[0] == "wgmma_wide"
            assert chosen(513, n, k, captured) == "chunked"
    rule = tuning.H200.wgmma_wide
    assert dispatch.wide_max_rows(rule, 28672, 8192) == 1024 and dispatch.wide_max_rows(rule, 8192, 8192) == 512
    assert dispatch.wide_max_rows(rule._replace(large_max_rows=0), 28672, 8192) == 512
    assert dispatch.wide_max_rows(rule._replace(large_max_rows=256), 28672, 8192) == 512  # never fewer
    assert tuning.HOPPER.wgmma_wide is None or tuning.HOPPER.wgmma_wide.large_max_rows == 0


def test_eager_calls_of_33_to_64_rows_and_k_4096_to_6143_take_one_launch_not_clusters(h200_without_a_gpu):
    """Eagerly, up to 64 input rows, the H200's tables run weights of K 4096-6143 on the
    tensor-core kernel's one launch where they would run the wide ``wgmma`` kernel in clusters
    that split K (two launches: measured 0.68-0.92x the time back to back on 5120-8192 x 4096,
    0.76-0.83x on 5120x5120); K 6144 and more keep the clusters (there the winner changed with the
    host's speed), as do 65 rows and more, captured calls, unsplit programs and the 64-row
    programs in clusters of two that fill three waves. (Support and the multiprocessor count are
    forced, so this runs without a GPU.)"""

    def chosen(rows: int, n: int, k: int, captured: bool = False) -> tuple | str:
        return dispatch.choose_config(torch.zeros(rows, k, dtype=torch.bfloat16), n, k, 64, captured=captured)

    for n in (5120, 6144, 8192, 8448):
        for k in (4096, 4352, 5120, 6144 - 256):
            assert [chosen(rows, n, k)[0] for rows in (33, 48, 64)] == ["fused"] * 3
            assert [chosen(rows, n, k, True)[0] for rows in (33, 64)] == ["wgmma_wide"] * 2
            assert chosen(65, n, k)[0] == "wgmma_wide"
        for k in (6144, 8192):
            assert [chosen(rows, n, k)[0] for rows in (33, 64)] == ["wgmma_wide"] * 2
    assert chosen(64, 5120, 5120, True) == ("wgmma_wide", 4, 64)
    assert chosen(64, 5120, 3072) == ("wgmma_wide", 4, 64)  # K under 4096: clusters of four, as measured
    assert chosen(64, 11008, 4096) == ("wgmma_wide", 2, 64)  # three waves of 64-row programs
    rule = tuning.H200.wgmma_wide
    assert rule.one_launch_k == (4096, 6144) and tuning.H200.captured.wgmma_wide.one_launch_k == (0, 0)
    assert dispatch.split_programs(rule, 64, 6144, 4096, 132) is None
    assert dispatch.split_programs(rule._replace(one_launch_k=(0, 0)), 64, 6144, 4096, 132) == (2, 128)


def test_up_to_64_rows_a_wave_or_two_of_128_row_programs_run_in_pairs_or_in_64_row_programs(h200_without_a_gpu):
    """Up to 64 input rows, where the H200's tables would run unsplit 128-row programs, up to one
    wave of them run in clusters of two that split K (14336x4096 at 64 rows measured 30.8 against
    35.8 us in graph replays), and 1-1.5 waves of them as unsplit 64-row programs, up to three a
    multiprocessor (20480x4096: 43.6 against 50.4); more stay unsplit (27648x5120: 62.0 against
    85.7 in 64-row programs), eager or captured; from 65 rows, the next test. (Support and the
    multiprocessor count are forced, so this runs without a GPU.)"""

    def chosen(rows: int, n: int, k: int, captured: bool = False) -> tuple | str:
        return dispatch.choose_config(torch.zeros(rows, k, dtype=torch.bfloat16), n, k, 64, captured=captured)

    for captured in (False, True):
        for n, k in ((12800, 4096), (14336, 4096), (13824, 5120), (16896, 8192)):  # 100-132 programs
            assert [chosen(rows, n, k, captured) for rows in (33, 64)] == [("wgmma_wide", 2, 128)] * 2, (n, k)
            assert chosen(65, n, k, captured) == ("wgmma_wide", 1, 128)
        for n, k in ((16897, 4096), (17408, 5120), (18944, 3584), (25344, 8192)):  # 133-198 programs
            assert [chosen(rows, n, k, captured) for rows in (33, 64)] == [("wgmma_wide", 1, 64)] * 2, (n, k)
            assert chosen(65, n, k, captured) == ("wgmma_wide", 2, 128)  # the next test
        for n, k in ((25345, 4096), (28672, 8192)):
            assert [chosen(rows, n, k, captured) for rows in (33, 64)] == [("wgmma_wide", 1, 128)] * 2
    rule = tuning.H200.wgmma_wide
    assert dispatch.split_programs(rule, 64, 14336, 4096 + 128, 132) == (2, 128)  # K of part of an iteration too
    assert dispatch.split_programs(rule._replace(small_pairs_waves=0.0), 64, 14336, 4096, 132) == (1, 64)
    off = rule._replace(small_pairs_waves=0.0, small_narrow_waves=0.0)
    assert dispatch.split_programs(off, 64, 14336, 4096, 132) == (1, 128)
    assert tuning.HOPPER.wgmma_wide is None or tuning.HOPPER.wgmma_wide.small_narrow_waves == 0


def test_65_to_128_rows_of_a_wave_or_more_of_128_row_programs_run_them_in_pairs(h200_without_a_gpu):
    """From 65 to 128 input rows, weights of more than one wave of 128-row programs and up to 1.5
    waves run them in clusters of two that split K (graph replays: 17408x5120 at 128 rows 80.2
    against 95.1 us unsplit, 18944x3584 at 80 rows 50.1 against 51.6); a wave or less (14336x4096
    at 128 rows: 40.7 unsplit against 45.7 in pairs), more than 1.5 waves and more than 128 rows
    stay unsplit, eager or captured. (Support and the multiprocessor count are forced, so this
    runs without a GPU.)"""

    def chosen(rows: int, n: int, k: int, captured: bool = False) -> tuple | str:
        return dispatch.choose_config(torch.zeros(rows, k, dtype=torch.bfloat16), n, k, 64, captured=captured)

    pairs, unsplit = ("wgmma_wide", 2, 128), ("wgmma_wide", 1, 128)
    for captured in (False, True):
        for n, k in ((16897, 4096), (17408, 5120), (18944, 3584), (25344, 8192)):  # 133-198 programs
            assert [chosen(rows, n, k, captured) for rows in (65, 96, 97, 128)] == [pairs] * 4, (n, k)
            assert chosen(129, n, k, captured) == unsplit
        for n, k in ((16896, 4096), (14336, 4096), (25345, 4096), (28672, 8192)):
            assert [chosen(rows, n, k, captured) for rows in (65, 128)] == [unsplit] * 2, (n, k)
    assert chosen(128, 17408, 5120 + 128) == pairs  # K of part of an iteration too
    rule = tuning.H200.wgmma_wide
    assert rule.pairs_past_a_wave == (128, 1.5)
    assert dispatch.split_programs(rule._replace(pairs_past_a_wave=(0, 0.0)), 128, 17408, 5120, 132) == unsplit[1:]
    assert tuning.HOPPER.wgmma_wide is None or tuning.HOPPER.wgmma_wide.pairs_past_a_wave == (0, 0.0)


def test_the_h200_tables_send_33_to_512_rows_of_weights_with_a_wave_of_programs_to_the_wide_wgmma(
    monkeypatch, h200_without_a_gpu
):
    """The H200's tables (eager and captured) run 33-512 rows on the wide ``wgmma`` kernel when
    its 128-row programs (those of every block of 256 input rows) fill at least 0.6 of the
    multiprocessors, or in clusters of two when
    twice the programs fill 0.6-1.0 of them (K of two or more 256-column iterations), and from
    65 rows in clusters of two of 64-row programs where those fill it; up to 64 rows, first,
    64-row programs in clusters of two where they fill 0.68-1.0 of three waves, then in clusters
    of four where they fill up to 2.5 waves, from one wave when each part keeps 3-5 iterations
    rather than 1-2 (eager: only in place of the wide kernel's other configurations); other weights
    (at 33-64 rows: ``wgmma`` where its own rule holds), fewer or more rows, or the Hopper tables
    (not measured there) keep the earlier paths. (Support and the multiprocessor count are
    forced, so this runs without a GPU.)"""

    def chosen(rows: int, n: int, captured: bool = False) -> tuple | str:
        return dispatch.choose_config(torch.zeros(rows, 4096, dtype=torch.bfloat16), n, 4096, 64, captured=captured)

    fills = 128 * 80  # 80 programs: 0.61 of 132
    for captured in (False, True):
        whole = ("wgmma_wide", 1, 128)
        assert [chosen(rows, 28672, captured) for rows in (33, 64, 65, 96, 128, 200, 256)] == [whole] * 7
        assert chosen(32, 28672, captured)[0] == "wgmma"
        assert [chosen(rows, 28672, captured) for rows in (257, 300, 384, 512)] == [whole] * 4
        assert chosen(513, 28672, captured) == "chunked"
        assert chosen(128, fills, captured) == whole
        assert chosen(128, fills - 128, captured) != whole
        assert chosen(257, fills // 2, captured) == whole  # 40 programs in each of two blocks
        assert chosen(256, fills // 2, captured) != whole
        # 32 programs of a 4096-row weight: two blocks fill a wave in clusters of two
        assert [chosen(rows, 4096, captured) for rows in (257, 512)] == [("wgmma_wide", 2, 128)] * 2
    assert chosen(64, 64 * 134, captured=True)[0] == "wgmma"  # one wave of its 64-row programs
    # weights of 0.3-0.5 of a wave of programs: clusters of two split K (8192, 6144 and 5120 rows);
    # at 33-64 rows of this K only under capture (``test_eager_calls_of_33_to_64_rows_and_k_4096_to_6143...``)
    for captured in (False, True):
        clustered = [chosen(rows, n, captured) for rows in (65, 128, 256) for n in (8192, 6144, 5120)]
        assert clustered == [("wgmma_wide", 2, 128)] * 9
        few = [chosen(33, n, True) for n in (8192, 6144, 5120)]
        assert few == [("wgmma_wide", 2, 128)] * 2 + [("wgmma_wide", 4, 64)]
        assert chosen(128, 128 * 67, captured)[0] != "wgmma_wide"  # 134: more than a wave, 0.51 unsplit
        assert chosen(128, 128 * 39, captured)[0] != "wgmma_wide"  # 78 of 132 (156 in 64-row programs)
        # too few 128-row programs: from 65 rows 64-row ones in clusters of two (4096, 3072, 2560 rows)
        narrow = [chosen(rows, n, captured) for rows in (65, 128, 256) for n in (4096, 3072, 2560)]
        assert narrow == [("wgmma_wide", 2, 64)] * 9
        assert chosen(64, 4096, captured) == (("wgmma_wide", 4, 64) if captured else chosen(64, 4096))  # below
        assert chosen(128, 64 * 39, captured)[0] != "wgmma_wide"  # 78 of 132: under 0.6
        assert chosen(128, 2048, captured)[0] != "wgmma_wide"
    # up to 64 rows, 64-row programs in clusters of two that fill 0.68-1.0 of three waves (396)
    for captured in (False, True):
        small = [chosen(rows, n, captured) for rows in (33, 48, 64) for n in (64 * 135, 11008, 64 * 198)]
        assert small == [("wgmma_wide", 2, 64)] * 9
        assert chosen(65, 11008, captured) == ("wgmma_wide", 1, 128)
        # 398 programs: past three waves, so 100 of 128 rows in clusters of two (the next test)
        assert chosen(64, 64 * 199, captured) == chosen(64, 14336, captured) == ("wgmma_wide", 2, 128)
        assert chosen(64, 64 * 134, captured)[0] != "wgmma_wide"  # 268: under 0.68 of them
        assert chosen(64, 8192, captured) == (("wgmma_wide", 2, 128) if captured else chosen(64, 8192))
    # then 64-row programs in clusters of four that fill up to 2.5 waves (from 1.0 at 3-5 iterations a part):
    # under capture in place of any kernel, eager calls only in place of the wide kernel's others
    for rows in (33, 48, 64):
        for n in (64 * 47, 4096, 64 * 80):
            assert chosen(rows, n, captured=True) == ("wgmma_wide", 4, 64)
            assert chosen(rows, n)[0] != "wgmma_wide" or n == 64 * 80
        assert chosen(rows, 5120)[0] == "fused"  # eager at K 4096: one launch, not clusters of any size
    assert chosen(65, 4096, captured=True) == ("wgmma_wide", 2, 64)
    assert chosen(64, 64 * 46, captured=True) == chosen(64, 64 * 33, captured=True) == ("wgmma_wide", 4, 64)
    assert chosen(64, 64 * 32, captured=True)[0] == "fused"  # 128 programs: under one wave of 132
    assert chosen(64, 64 * 83, captured=True) == ("wgmma_wide", 2, 128)  # 332: past 2.5
    assert chosen(64, 2048)[0] != "wgmma_wide"  # eager: the fused kernel's one launch

    def iterations(k: int, n: int = 4096) -> tuple | str:
        return dispatch.choose_config(torch.zeros(64, k, dtype=torch.bfloat16), n, k, 64, captured=True)

    assert iterations(5120) == iterations(4352) == iterations(5120, 5120) == ("wgmma_wide", 4, 64)
    assert iterations(1024) == iterations(2048, 2048) == iterations(3072, 3072) == ("wgmma_wide", 4, 64)
    assert iterations(2048, 256) == iterations(1024, 64) == ("wgmma_wide", 4, 64)  # 1-2 a part: from 4 programs
    assert iterations(3072, 2048)[0] == "fused"  # 3 a part: 128 programs, under one wave
    assert iterations(768)[0] != "wgmma_wide"  # 3 iterations: under one a part
    assert iterations(2048, 6144) == ("wgmma_wide", 2, 128)  # 384 programs: past 2.5 of 132
    assert iterations(6144)[0] != "wgmma_wide" and iterations(14336)[0] != "wgmma_wide"  # 6 and 14 a part
    assert iterations(6144, 5120) == ("wgmma_wide", 2, 128)
    one_iteration_few_rows = torch.zeros(64, 256, dtype=torch.bfloat16)
    assert dispatch.choose_config(one_iteration_few_rows, 11008, 256, 64) == ("wgmma_wide", 1, 128)
    odd_k = torch.zeros(128, 4352, dtype=torch.bfloat16)  # 17 iterations: parts of 8 and 9
    assert dispatch.choose_config(odd_k, 8192, 4352, 64) == ("wgmma_wide", 2, 128)
    assert dispatch.choose_config(odd_k, 4096, 4352, 64) == ("wgmma_wide", 2, 64)
    one_iteration = torch.zeros(128, 256, dtype=torch.bfloat16)  # nothing to split
    assert dispatch.choose_config(one_iteration, 8192, 256, 64)[0] != "wgmma_wide"
    even_k = torch.zeros(128, 4608, dtype=torch.bfloat16)
    assert dispatch.choose_config(even_k, 8192, 4608, 64) == ("wgmma_wide", 2, 128)
    # clusters of three where two fill too little and each part keeps 8 iterations (from 65 rows)
    for rows in (65, 128, 256):
        x = torch.zeros(rows, 14336, dtype=torch.bfloat16)
        assert dispatch.choose_config(x, 4096, 14336, 64) == ("wgmma_wide", 3, 128)  # 96 of 132
        assert dispatch.choose_config(x[:, :8192], 2048, 8192, 64) == ("wgmma_wide", 3, 64)
        assert dispatch.choose_config(x[:, :6144], 4096, 6144, 64) == ("wgmma_wide", 3, 128)  # 8 iterations a part
        assert dispatch.choose_config(x[:, :5888], 4096, 5888, 64) == ("wgmma_wide", 2, 64)  # 7.7
        assert dispatch.choose_config(x[:, :14336], 6144, 14336, 64) == ("wgmma_wide", 2, 128)  # two fill 96
    assert dispatch.choose_config(torch.zeros(64, 8192, dtype=torch.bfloat16), 2048, 8192, 64)[0] != "wgmma_wide"
    monkeypatch.setattr(dispatch, "CLUSTER_LAUNCH", False)  # a Triton whose cluster launch is not checked
    assert chosen(128, 8192)[0] != "wgmma_wide" and chosen(128, 28672) == ("wgmma_wide", 1, 128)
    assert chosen(128, 4096)[0] != "wgmma_wide" and chosen(64, 11008) == ("wgmma_wide", 1, 128)
    monkeypatch.setattr(dispatch, "CLUSTER_LAUNCH", True)
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.HOPPER)
    assert chosen(128, 28672) != ("wgmma_wide", 1, 128)
    assert chosen(128, 8192)[0] != "wgmma_wide" and chosen(128, 4096)[0] != "wgmma_wide"  # tables without clusters
    assert chosen(64, 11008)[0] != "wgmma_wide"


def test_the_h200_tables_run_k_of_part_of_an_iteration_on_the_wide_wgmma_from_65_rows(h200_without_a_gpu):
    """K not a multiple of 256 (each step its own nested absmax) keeps the tensor-core kernel up
    to 64 rows, where it measured 5-7% faster on an H200 than the wide ``wgmma`` kernel
    (8192x29568 at 48 and 64 rows), and takes the wide kernel from 65; K of whole iterations
    takes it from 33. The few-row ``wgmma`` kernel (17-64 rows) takes no such K."""

    def chosen(rows: int, n: int, k: int, captured: bool = False) -> tuple | str:
        return dispatch.choose_config(torch.zeros(rows, k, dtype=torch.bfloat16), n, k, 64, captured=captured)

    assert dispatch.min_rows(tuning.H200.wgmma_wide, 29568) == 65
    assert dispatch.min_rows(tuning.H200.wgmma_wide, 28672) == 33
    for captured in (False, True):
        for rows in (33, 48, 64):
            assert chosen(rows, 8192, 29568, captured)[0] == "fused", (rows, captured)
            assert chosen(rows, 8192, 28672, captured)[0] == "wgmma_wide", (rows, captured)
        for rows in (65, 128, 256):
            assert chosen(rows, 8192, 29568, captured) == ("wgmma_wide", 2, 128), (rows, captured)
    assert chosen(64, 1024, 1472, captured=True)[0] == "fused"  # no clusters of four below 65 either
    for captured in (False, True):  # 2 waves of 64-row programs: the few-row kernel's weights
        assert [chosen(rows, 16896, 4096, captured)[0] for rows in (17, 32)] == ["wgmma", "wgmma"], captured
        assert [chosen(rows, 16896, 4096 + 64, captured)[0] for rows in (17, 32)] == ["fused", "fused"], captured
    assert dispatch.min_rows(tuning.H200.wgmma, 4096 + 64) == 65 and dispatch.min_rows(tuning.H200.wgmma, 4096) == 17


def test_under_capture_the_h200_tables_run_17_to_32_rows_of_short_k_in_clusters_of_four(
    monkeypatch, h200_without_a_gpu
):
    """Recorded into a CUDA graph, 17-32 rows against a K of 1024-2047 (parts of one iteration)
    run 64-row programs in clusters of four where they fill up to 2.5 waves, as from 33 rows
    (on an H200 1024x1024 took 6.6 us against 9.0); a longer K (even at 2048, lost at 4096),
    more programs, eager calls and the Hopper tables keep the tensor-core kernel."""

    def chosen(rows: int, n: int, k: int, captured: bool = True) -> tuple | str:
        return dispatch.choose_config(torch.zeros(rows, k, dtype=torch.bfloat16), n, k, 64, captured=captured)

    quarter = ("wgmma_wide", 4, 64)
    for rows in (17, 24, 32):
        for n, k in [(1024, 1024), (2048, 1024), (4096, 1024), (64 * 82, 1024), (1024, 1792)]:
            assert chosen(rows, n, k) == quarter, (rows, n, k)
            assert chosen(rows, n, k, captured=False)[0] == "fused"
        assert chosen(rows, 64 * 83, 1024)[0] == "fused"  # 332 programs: past 2.5 waves of 132
        assert chosen(rows, 1024, 2048)[0] == chosen(rows, 2048, 4096)[0] == "fused"
    assert chosen(16, 1024, 1024)[0] == "fragments"
    assert chosen(33, 1024, 2048) == quarter  # from 33 rows the rule takes longer K too
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.HOPPER)
    assert chosen(17, 1024, 1024)[0] == "fused"
