"""Each conv algorithm of the numba backend, forced, against the NumPy reference and PyTorch.

``force_conv_algorithm`` pins one algorithm wherever a geometry allows it (Winograd: 3x3, stride 1,
dilation 1, one group); every test checks the algorithm really ran (``last_algorithm``) before it
compares values, so a silently ignored force fails here. The 200-config sweep of
test_numba_backend runs again with each Winograd tile forced.
"""

from __future__ import annotations

import logging
import math

import conftest

import numpy as np
import pytest
from test_numba_backend import N_CONFIGS, assert_close, check_conv2d_config, nb, ref  # noqa: F401 (fixtures)

from convrpc.core import params

numba_backend = pytest.importorskip("convrpc.core.numba_backend")
ALGORITHMS = numba_backend.CONV_ALGORITHMS
WINOGRAD = [a for a in ALGORITHMS if a.startswith("winograd")]

#: 3x3 stride-1 geometries every algorithm can run: odd sizes, partial last tiles, padding 0-3
#: (3 makes the flipped input gradient a crop), asymmetric padding, batch 1 and 3, 1 to 20 channels.
CASES = [
    ((1, 1, 5, 5), (1, 1, 3, 3), 0),
    ((3, 2, 7, 9), (4, 2, 3, 3), 1),
    ((2, 5, 6, 11), (3, 5, 3, 3), (2, 0)),
    ((1, 4, 5, 4), (6, 4, 3, 3), 3),
    ((2, 20, 9, 10), (17, 20, 3, 3), 1),
    ((1, 3, 3, 3), (2, 3, 3, 3), (0, 2)),
]


@pytest.fixture
def force():
    yield numba_backend.force_conv_algorithm
    numba_backend.force_conv_algorithm(None)


def _arrays(x_shape, w_shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "direct-winograd"])  # its own tests below
def test_forced_algorithm_matches_the_reference(nb, ref, force, algorithm, case, dtype):
    x_shape, w_shape, padding = CASES[case]
    x, w, b = _arrays(x_shape, w_shape, dtype, case)
    force(algorithm)
    got = nb.conv2d(x, w, b, padding=padding)
    assert numba_backend.last_algorithm["forward"] == algorithm
    want = ref.conv2d(x, w, b, padding=padding)
    assert_close(got, want, f"{algorithm} conv2d")
    gy = np.random.default_rng(7).standard_normal(want.shape).astype(dtype)
    grads = nb.conv2d_backward(gy, x, w, b, padding=padding)
    if algorithm in WINOGRAD:
        assert numba_backend.last_algorithm["grad-input"] == f"flipped {algorithm}"
        assert numba_backend.last_algorithm["grad-weight"] == "winograd-2x2"  # the one weight-gradient tile
    if algorithm == "direct-wide":
        assert numba_backend.last_algorithm["grad-input"] == "flipped direct-wide"
        assert numba_backend.last_algorithm["grad-weight"] == "direct-wide"
    expected = ref.conv2d_backward(gy, x, w, b, padding=padding)
    assert_close(grads.input, expected.input, f"{algorithm} grad input")
    assert_close(grads.weight, expected.weight, f"{algorithm} grad weight")
    assert_close(grads.bias, expected.bias, f"{algorithm} grad bias")


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", WINOGRAD)
def test_winograd_matches_torch_on_many_channels(nb, force, algorithm, dtype):
    """64 channels in and out, values up to 1e3: rounding adds up where Winograd's transforms amplify it."""
    torch = pytest.importorskip("torch")
    x, w, b = _arrays((2, 64, 13, 12), (64, 64, 3, 3), dtype, 3)
    x *= 1e3
    force(algorithm)
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w)
    yt = torch.nn.functional.conv2d(xt, wt, torch.from_numpy(b), padding=1)
    gy = np.random.default_rng(4).standard_normal(tuple(yt.shape)).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    assert_close(nb.conv2d(x, w, b, padding=1), yt.detach().numpy(), f"{algorithm} conv2d")
    assert numba_backend.last_algorithm["forward"] == algorithm
    yt = torch.nn.functional.conv2d(torch.from_numpy(x), wt.requires_grad_(), None, padding=1)
    yt.backward(torch.from_numpy(gy))
    grads = nb.conv2d_backward(gy, x, w, b, padding=1)
    assert_close(grads.input, xt.grad.numpy(), f"{algorithm} grad input")
    assert numba_backend.last_algorithm["grad-weight"] == "winograd-2x2"
    assert_close(grads.weight, wt.grad.numpy(), f"{algorithm} grad weight")


@pytest.mark.parametrize("algorithm", [*WINOGRAD, "direct-wide"])
@pytest.mark.parametrize("i", range(0, N_CONFIGS, 2))
def test_sweep_with_winograd_forced(nb, ref, force, algorithm, i):
    """Winograd where it fits (3x3 stride 1); direct-wide on every one-group config (strides, dilations,
    crops, 1-16 channels): the automatic choice runs it only on some."""
    force(algorithm)
    check_conv2d_config(nb, ref, i)


#: Rows wide enough for the Winograd transforms' vector passes (a _simd vector of tiles: 16 float32,
#: 8 float64, for every tile size): odd widths (the last vector shifted back, partial last tiles),
#: padding 0-3 on either side (the column phases' edges), a row of phases narrower than a vector.
WIDE_CASES = [
    ((1, 3, 5, 70), (2, 3, 3, 3), 1),
    ((2, 2, 7, 101), (3, 2, 3, 3), (0, 2)),
    ((1, 2, 4, 50), (2, 2, 3, 3), 3),
    ((1, 1, 6, 67), (1, 1, 3, 3), 0),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(WIDE_CASES)))
@pytest.mark.parametrize("algorithm", WINOGRAD)
def test_winograd_matches_the_reference_on_wide_rows(nb, ref, force, algorithm, case, dtype):
    x_shape, w_shape, padding = WIDE_CASES[case]
    x, w, b = _arrays(x_shape, w_shape, dtype, case)
    force(algorithm)
    want = ref.conv2d(x, w, b, padding=padding)
    assert_close(nb.conv2d(x, w, b, padding=padding), want, f"{algorithm} conv2d")
    assert numba_backend.last_algorithm["forward"] == algorithm
    gy = np.random.default_rng(8).standard_normal(want.shape).astype(dtype)
    grads = nb.conv2d_backward(gy, x, w, b, padding=padding)
    expected = ref.conv2d_backward(gy, x, w, b, padding=padding)
    assert numba_backend.last_algorithm["grad-weight"] == "winograd-2x2"
    assert_close(grads.input, expected.input, f"{algorithm} grad input")
    assert_close(grads.weight, expected.weight, f"{algorithm} grad weight")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [4, 23, 70])  # narrower than a vector of tiles, about one, several
@pytest.mark.parametrize("algorithm", WINOGRAD)
def test_winograd_writes_only_inside_its_scratch(nb, ref, force, monkeypatch, algorithm, width, dtype):
    """The transforms' vectors run past their rows: every scratch array handed out is followed by a guard
    of sentinel values, which must come back untouched (the worker buffers are often larger than asked,
    so an overrun there would corrupt only the heap, later)."""
    handed = []

    def guarded(worker, shape, dt):
        size = math.prod(shape)
        flat = np.full(size + 64, 1234.5, dtype=dt)
        handed.append((flat, size))
        return flat[:size].reshape(shape)

    monkeypatch.setattr(numba_backend, "_buffer", guarded)
    x, w, b = _arrays((2, 3, 7, width), (4, 3, 3, 3), dtype, width)
    force(algorithm)
    want = ref.conv2d(x, w, b, padding=1)
    assert_close(nb.conv2d(x, w, b, padding=1), want, f"{algorithm} conv2d")
    gy = np.random.default_rng(3).standard_normal(want.shape).astype(dtype)
    expected = ref.conv2d_backward(gy, x, w, b, padding=1)
    grads = nb.conv2d_backward(gy, x, w, b, padding=1)
    assert numba_backend.last_algorithm["grad-weight"] == "winograd-2x2"
    assert_close(grads.input, expected.input, "grad input")
    assert_close(grads.weight, expected.weight, "grad weight")
    assert handed
    for flat, size in handed:
        assert (flat[size:] == 1234.5).all()


@pytest.mark.parametrize("algorithm", [*WINOGRAD, "direct-wide"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("width", [9, 70])  # the transforms' scalar and vector passes
def test_winograd_keeps_non_finite_values_where_the_direct_sum_puts_them(nb, ref, force, algorithm, value, width):
    """A NaN or inf spreads over a whole Winograd tile, and direct-wide's weight gradient multiplies the grid's
    overhang (neighbouring rows' inputs) by 0; such results are recomputed exactly."""
    x, w, b = _arrays((2, 16, 8, width), (16, 16, 3, 3), np.float64)
    x[1, 3, 2, width - 4] = value
    force(algorithm)
    got = nb.conv2d(x, w, b, padding=1)
    want = ref.conv2d(x, w, b, padding=1)
    assert np.isnan(want).any() or np.isinf(want).any()
    conftest.assert_close(got, want, what="conv2d")  # NaN and inf positions equal, the rest close
    gy = np.random.default_rng(5).standard_normal(want.shape)
    got_w = nb.conv2d_backward(gy, x, w, b, padding=1).weight
    want_w = ref.conv2d_backward(gy, x, w, b, padding=1).weight
    conftest.assert_close(got_w, want_w, what="conv2d weight gradient")


def test_winograd_is_chosen_for_wide_3x3_convs_and_not_for_few_channels(force):
    force(None)
    wide = params.conv2d_geometry((2, 32, 14, 14), (32, 32, 3, 3), None, padding=1)
    few = params.conv2d_geometry((8, 3, 14, 14), (16, 3, 3, 3), None, padding=1)
    strided = params.conv2d_geometry((2, 32, 14, 14), (32, 32, 3, 3), None, stride=2, padding=1)
    for itemsize in (4, 8):
        tile = numba_backend.WINOGRAD_TILE[itemsize]
        assert numba_backend.conv_algorithm(wide, itemsize) == f"winograd-{tile}x{tile}"
        assert not numba_backend.conv_algorithm(few, itemsize).startswith("winograd")
        assert not numba_backend.conv_algorithm(strided, itemsize).startswith("winograd")
        assert numba_backend._weight_grad_by_winograd(wide, itemsize, serial=False)
        assert not numba_backend._weight_grad_by_winograd(few, itemsize, serial=False)
        assert not numba_backend._weight_grad_by_winograd(strided, itemsize, serial=False)


def test_the_choice_is_made_once_per_shape_and_logged(force, caplog):
    force(None)  # also empties the cache
    g = params.conv2d_geometry((1, 16, 10, 10), (16, 16, 3, 3), None, padding=1)
    with caplog.at_level(logging.DEBUG, logger=numba_backend.__name__):
        first = numba_backend.conv_algorithm(g, 8)
        assert numba_backend.conv_algorithm(g, 8) == first
    logged = [r.getMessage() for r in caplog.records if r.name == numba_backend.__name__]
    assert len(logged) == 1 and logged[0].endswith(first)


def test_a_forced_algorithm_that_cannot_run_a_geometry_gives_way(nb, ref, force):
    x, w, b = _arrays((1, 4, 9, 9), (8, 4, 5, 5), np.float64)
    force("winograd-2x2")
    assert_close(nb.conv2d(x, w, b, padding=2), ref.conv2d(x, w, b, padding=2), "5x5 conv2d")
    assert numba_backend.last_algorithm["forward"] != "winograd-2x2"


def test_unknown_algorithm_names_are_refused(force):
    with pytest.raises(ValueError, match="winograd-2x2"):
        force("fft")


@pytest.mark.parametrize("algorithm", WINOGRAD)
def test_winograd_splits_images_into_tile_rows_under_a_small_workspace(nb, ref, force, algorithm):
    x, w, b = _arrays((2, 8, 21, 20), (8, 8, 3, 3), np.float64)
    g = params.conv2d_geometry(x.shape, w.shape, b.shape, padding=1)
    old = numba_backend.workspace_limit()
    numba_backend.set_workspace_limit(100 * 1024)
    try:
        tasks, _ = numba_backend._winograd_tasks(g, 8, int(algorithm[-1]), serial=False)
        assert any(th0 > 0 for _, _, th0, _ in tasks)  # parts of an image, not whole ones
        force(algorithm)
        assert_close(nb.conv2d(x, w, b, padding=1), ref.conv2d(x, w, b, padding=1), "conv2d")
        assert numba_backend.last_algorithm["forward"] == algorithm
        gy = np.random.default_rng(6).standard_normal(g.output_shape)
        got = nb.conv2d_backward(gy, x, w, b, padding=1).weight
        assert numba_backend.last_algorithm["grad-weight"] == "winograd-2x2"
        assert_close(got, ref.conv2d_backward(gy, x, w, b, padding=1).weight, "conv2d weight gradient")
    finally:
        numba_backend.set_workspace_limit(old)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "x_shape, w_shape, opts",
    [
        ((1, 2, 11, 8), (3, 2, 2, 3), dict(stride=2, padding=(1, 0))),
        ((3, 4, 12, 13), (4, 4, 3, 2), dict(dilation=2)),
        ((2, 3, 15, 15), (16, 3, 7, 7), dict(stride=2, padding=3)),
        ((2, 5, 7, 9), (3, 5, 3, 3), dict(stride=3, padding=2, dilation=2)),
        # Rows of a vector (16 float32, 8 float64) or more, in blocks (the last shifted back), 1-13 channels.
        ((1, 3, 20, 45), (7, 3, 5, 5), dict(stride=2, padding=2)),
        ((2, 2, 9, 40), (13, 2, 3, 3), dict(padding=1, dilation=(1, 2))),
        ((1, 1, 4, 18), (1, 1, 3, 3), {}),
        ((2, 3, 13, 20), (4, 3, 3, 3), dict(padding=1)),  # blocks of 6 rows of one channel, the last one short
    ],
)
def test_direct_wide_runs_strided_and_dilated_convs(nb, ref, force, monkeypatch, x_shape, w_shape, opts, dtype, parallel):
    """Odd channel counts and tap counts (a last block of fewer than 6 channels, taps padded to fours for
    the weight gradient), stride and dilation phases, outputs narrower and wider than a vector; tiny
    calls run the kernels' serial twins, so ``parallel`` runs the parallel ones on the same shapes."""
    if parallel:
        monkeypatch.setattr(numba_backend, "SERIAL_WORK", 0)
    x, w, b = _arrays(x_shape, w_shape, dtype, 8)
    force("direct-wide")
    got = nb.conv2d(x, w, b, **opts)
    assert numba_backend.last_algorithm["forward"] == "direct-wide"
    want = ref.conv2d(x, w, b, **opts)
    assert_close(got, want, "direct-wide conv2d")
    gy = np.random.default_rng(9).standard_normal(want.shape).astype(dtype)
    grads = nb.conv2d_backward(gy, x, w, b, **opts)
    assert numba_backend.last_algorithm["grad-weight"] == "direct-wide"
    expected = ref.conv2d_backward(gy, x, w, b, **opts)
    assert_close(grads.input, expected.input, "direct-wide grad input")
    assert_close(grads.weight, expected.weight, "direct-wide grad weight")


def test_direct_wide_is_chosen_for_few_taps_within_the_workspace_cap(force):
    force(None)
    few_taps = params.conv2d_geometry((32, 3, 32, 32), (16, 3, 3, 3), None, padding=1)  # 27 taps
    strided = params.conv2d_geometry((1, 3, 224, 224), (64, 3, 7, 7), None, stride=2, padding=3)  # g: 147
    many_taps = params.conv2d_geometry((2, 24, 40, 40), (48, 24, 5, 5), None, padding=2)  # 600
    assert numba_backend.conv_algorithm(few_taps, 8) == "direct-wide"
    assert numba_backend.conv_algorithm(strided, 4) == ("direct-winograd" if numba_backend.WINOGRAD_ROW else "direct-wide")
    assert numba_backend.conv_algorithm(many_taps, 8) != "direct-wide"
    old = numba_backend.workspace_limit()
    numba_backend.set_workspace_limit(16 * 1024)  # not one padded image (3 x 35 x 34 float64)
    try:
        assert numba_backend.conv_algorithm(few_taps, 8) != "direct-wide"
    finally:
        numba_backend.set_workspace_limit(old)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize(
    "x_shape, w_shape, opts",
    [
        ((3, 3, 40, 36), (10, 3, 7, 7), dict(stride=2, padding=3)),  # blocks of 6 channels
        ((3, 2, 31, 20), (3, 2, 3, 5), dict(padding=(2, 1), dilation=(2, 1))),  # blocks of 6 rows
        ((3, 2, 9, 6), (5, 2, 3, 3), dict(padding=1)),  # narrow: blocks along the grid
    ],
)
def test_direct_wide_reads_no_stale_scratch(nb, ref, force, monkeypatch, x_shape, w_shape, opts, parallel):
    """Each thread pads only the rows its jobs read into a reused scratch: a call after one on a NaN
    input must not see any of it (parallel: the second thread starts in the middle of an image)."""
    if parallel:
        monkeypatch.setattr(numba_backend, "SERIAL_WORK", 0)
    force("direct-wide")
    x, w, b = _arrays(x_shape, w_shape, np.float32, 11)
    assert np.isnan(nb.conv2d(np.full_like(x, np.nan), w, b, **opts)).all()
    assert numba_backend.last_algorithm["forward"] == "direct-wide"
    assert_close(nb.conv2d(x, w, b, **opts), ref.conv2d(x, w, b, **opts), "direct-wide after a NaN input")


def test_direct_wide_weight_gradient_only_where_it_was_measured(nb, force):
    """The forward of g (7x7 stride 2, 147 taps) is direct-wide (direct-winograd with AVX-512), its weight
    gradient stays im2col + BLAS; c's (27 taps, stride 1) is direct-wide."""
    force(None)
    for x_shape, w_shape, opts, want in [
        ((1, 3, 64, 64), (64, 3, 7, 7), dict(stride=2, padding=3), "im2col"),
        ((32, 3, 32, 32), (16, 3, 3, 3), dict(padding=1), "direct-wide"),
    ]:
        x, w, b = _arrays(x_shape, w_shape, np.float32)
        y = nb.conv2d(x, w, b, **opts)
        strided = opts.get("stride") == 2 and numba_backend.WINOGRAD_ROW
        assert numba_backend.last_algorithm["forward"] == ("direct-winograd" if strided else "direct-wide")
        nb.conv2d_backward(np.ones_like(y), x, w, b, **opts)
        assert numba_backend.last_algorithm["grad-weight"] == want


def test_direct_wide_is_chosen_for_few_channel_stride_1_convs_only(force):
    """a and b of bench/core.py (too few channels for BLAS); not strided or grouped ones."""
    force(None)
    few = [params.conv2d_geometry((1, 1, 80, 80), (1, 1, 3, 3)), params.conv2d_geometry((3, 3, 28, 28), (4, 3, 3, 3))]
    others = [params.conv2d_geometry((3, 3, 28, 28), (4, 3, 3, 3), stride=2),
              params.conv2d_geometry((2, 8, 9, 9), (8, 2, 3, 3), padding=1, groups=4)]  # fmt: skip
    for itemsize in (4, 8):
        for g in few:
            assert numba_backend.conv_algorithm(g, itemsize, serial=True) == "direct-wide"
            assert numba_backend.conv_algorithm(g, itemsize, serial=False) == "direct-wide"
        for g in others:
            assert numba_backend.conv_algorithm(g, itemsize) != "direct-wide"


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_direct_wide_weight_gradient_keeps_non_finite_values_where_the_direct_sum_puts_them(nb, ref, value):
    """The grid's overhang multiplies gy's zeros with inputs its taps never read: a NaN or inf in the corner
    (read by one tap only) must reach that tap's gradient and no other."""
    x, w, b = _arrays((2, 3, 7, 9), (4, 3, 3, 3), np.float64)
    x[1, 2, 0, 8] = value
    gy = np.random.default_rng(5).standard_normal((2, 4, 5, 7))
    want = ref.conv2d_backward(gy, x, w, b).weight
    assert np.isfinite(want).sum() == want.size - 4  # tap (2, 0, 2) of each output channel
    conftest.assert_close(nb.conv2d_backward(gy, x, w, b).weight, want, what="conv2d weight gradient")


def _phase_planes_reference(x, n, c, r0, sh, sw, pt, pl, wg, rows, lo, hi, fill):
    """The phase planes by their definition: plane a*sw + b, row rr, column u holds x[n, c, ih, iw] with
    ih = (r0 + rr)*sh - pt + a and iw = u*sw + b - pl where that lies in the image, else 0; rows outside
    lo .. hi keep ``fill``."""
    h, wd = x.shape[2:]
    out = np.full((sh * sw, rows, wg), fill, dtype=x.dtype)
    for a in range(sh):
        for b in range(sw):
            for rr in range(lo, hi):
                ih = (r0 + rr) * sh - pt + a
                for u in range(wg):
                    iw = u * sw + b - pl
                    out[a * sw + b, rr, u] = x[n, c, ih, iw] if 0 <= ih < h and 0 <= iw < wd else 0
    return out.reshape(-1)


@pytest.mark.parametrize("sh, sw", [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2)])
def test_phase_planes_hold_the_padded_image(sh, sw):
    """_wide_pad_rows (stride 2 columns: both phases in one pass) against the planes' definition: odd and
    even widths and paddings, crops (negative padding), grids narrower and wider than the image, and
    partial row ranges, which must leave the other rows alone."""
    import numba

    @numba.njit
    def fill(x, pad, n, c, r0, sh, sw, pt, pl, wg, lo, hi):
        numba_backend._k._wide_pad_rows(x, n, c, pad, r0, sh, sw, pt, pl, wg, lo, hi)

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 2, 7, 9)).astype(np.float32)
    rows = 5
    for wd in (1, 2, 8, 9):
        xs = np.ascontiguousarray(x[:, :, :, :wd])
        for pt, pl, wg, (lo, hi), r0 in [(0, 0, 5, (0, 5), 0), (1, 3, 6, (0, 5), 0), (2, 1, 9, (1, 4), 1),
                                         (-1, -2, 3, (0, 5), 0), (3, -1, 1, (2, 3), 0), (0, 4, 8, (0, 2), 1)]:
            pad = np.full(sh * sw * rows * wg, 7.0, dtype=np.float32)
            fill(xs, pad, 1, 1, r0, sh, sw, pt, pl, wg, lo, hi)
            want = _phase_planes_reference(xs, 1, 1, r0, sh, sw, pt, pl, wg, rows, lo, hi, 7.0)
            np.testing.assert_array_equal(pad, want, err_msg=f"width {wd} pt {pt} pl {pl} wg {wg} rows {lo}-{hi}")


#: Column stride 2 with 7 or 8 taps a row and OW a multiple of 4: row strides 1-3, dilated rows, asymmetric
#: padding, 1-9 output channels (a last block of 1-3), batch 1-3, rows narrower and wider than a vector of tiles.
WINOGRAD_ROW_CASES = [
    ((1, 3, 64, 64), (64, 3, 7, 7), dict(stride=2, padding=3)),
    ((2, 2, 9, 31), (5, 2, 7, 7), dict(stride=2, padding=3)),
    ((3, 4, 20, 32), (9, 4, 8, 8), dict(stride=(1, 2), padding=(2, 3))),
    ((1, 3, 45, 38), (6, 3, 7, 7), dict(stride=(3, 2), padding=(1, 4), dilation=(2, 1))),
    ((2, 1, 17, 37), (3, 1, 7, 7), dict(stride=2)),
    ((1, 2, 70, 140), (2, 2, 8, 7), dict(stride=(2, 2), padding=(0, 1))),
]


@pytest.mark.parametrize("by_position", [False, True])  # 28 accumulators (AVX-512), or 4 a position
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(WINOGRAD_ROW_CASES)))
def test_direct_winograd_matches_the_reference(nb, ref, force, monkeypatch, case, dtype, parallel, by_position):
    if parallel:
        monkeypatch.setattr(numba_backend, "SERIAL_WORK", 0)
    monkeypatch.setattr(numba_backend, "WINOGRAD_ROW_BY_POSITION", by_position)
    x_shape, w_shape, opts = WINOGRAD_ROW_CASES[case]
    x, w, b = _arrays(x_shape, w_shape, dtype, 12 + case)
    force("direct-winograd")
    for bias in (b, None):
        got = nb.conv2d(x, w, bias, **opts)
        assert numba_backend.last_algorithm["forward"] == "direct-winograd"
        assert_close(got, ref.conv2d(x, w, bias, **opts), "direct-winograd conv2d")
    gy = np.random.default_rng(9).standard_normal(got.shape).astype(dtype)
    grads, expected = nb.conv2d_backward(gy, x, w, b, **opts), ref.conv2d_backward(gy, x, w, b, **opts)
    assert_close(grads.input, expected.input, "grad input")
    assert_close(grads.weight, expected.weight, "grad weight")


@pytest.mark.torch
def test_direct_winograd_is_as_close_to_torch_as_the_direct_sum_on_g(nb, force):
    """F(4, 4)'s transforms carry 10 and 1/45-type factors; on g its float32 error stays within 4x the direct sum's."""
    torch = pytest.importorskip("torch")
    x, w, b = _arrays((1, 3, 224, 224), (64, 3, 7, 7), np.float32, 13)
    want = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                      torch.from_numpy(b).double(), stride=2, padding=3).numpy()  # fmt: skip
    errors = {}
    for algorithm in ("direct-winograd", "direct-wide"):
        force(algorithm)
        got = nb.conv2d(x, w, b, stride=2, padding=3)
        assert numba_backend.last_algorithm["forward"] == algorithm
        errors[algorithm] = float(np.abs(got - want).max() / np.abs(want).max())
    assert errors["direct-winograd"] <= max(4 * errors["direct-wide"], 2e-6), errors


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("width", [37, 38])
def test_direct_winograd_keeps_non_finite_values_where_the_direct_sum_puts_them(nb, ref, force, value, width):
    """The transforms turn an inf into NaN and read past the taps (width 38: no output's taps reach the
    last column, the last tile's transform does); such outputs are recomputed by direct-wide, and the
    next call (same scratch) is exact again."""
    x, w, b = _arrays((2, 2, 21, width), (5, 2, 7, 7), np.float64, 14)
    x[1, 1, 10, width - 1] = value
    force("direct-winograd")
    got = nb.conv2d(x, w, b, stride=2)
    assert numba_backend.last_algorithm["forward"] == "direct-wide"
    want = ref.conv2d(x, w, b, stride=2)
    assert np.isfinite(want).all() == (width == 38)
    conftest.assert_close(got, want, what="conv2d")
    x[1, 1, 10, width - 1] = 0.5
    assert_close(nb.conv2d(x, w, b, stride=2), ref.conv2d(x, w, b, stride=2), "after")
    assert numba_backend.last_algorithm["forward"] == "direct-winograd"


def test_direct_winograd_fits_only_its_geometries(force):
    force(None)
    fits = numba_backend._fits
    g = params.conv2d_geometry((1, 3, 224, 224), (64, 3, 7, 7), None, stride=2, padding=3)
    assert fits("direct-winograd", g, 4, False) and fits("direct-winograd", g, 8, True)
    for other in [
        params.conv2d_geometry((1, 3, 226, 226), (64, 3, 7, 7), None, stride=2, padding=3),  # OW 113
        params.conv2d_geometry((1, 3, 222, 222), (64, 3, 7, 7), None, stride=2, padding=3),  # OW 111
        params.conv2d_geometry((1, 4, 224, 224), (64, 2, 7, 7), None, stride=2, padding=3, groups=2),
        params.conv2d_geometry((1, 3, 224, 224), (64, 3, 5, 5), None, stride=2, padding=2),
        params.conv2d_geometry((1, 3, 224, 224), (64, 3, 7, 7), None, stride=1, padding=3),
        params.conv2d_geometry((1, 3, 224, 224), (64, 3, 7, 7), None, stride=2, padding=3, dilation=(1, 2)),
        params.conv2d_geometry((1, 3, 13, 16), (4, 3, 7, 7), None, stride=2, padding=3),  # 7 x 2 tiles: < a vector
    ]:
        assert not fits("direct-winograd", other, 4, False), other
    assert numba_backend.conv_algorithm(g, 4) == ("direct-winograd" if numba_backend.WINOGRAD_ROW else "direct-wide")


def test_a_stop_flag_stops_direct_winograd(nb, force):
    from convrpc.core.errors import CallCancelled
    from convrpc.core.stopping import StopFlag, stopping

    x, w, b = _arrays((1, 3, 64, 64), (64, 3, 7, 7), np.float32)
    force("direct-winograd")
    flag = StopFlag()
    flag.cancel()
    with pytest.raises(CallCancelled), stopping(flag):
        nb.conv2d(x, w, b, stride=2, padding=3)
