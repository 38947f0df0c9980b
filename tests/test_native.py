"""The compiled bilinear kernel (shiftlab.equivariance.kernels.native) against the eager code and explicit
upsampling, its fallbacks, and how it is built and cached."""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import re
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from shiftlab.equivariance.kernels import build, native
from shiftlab.equivariance.kernels.differences import choose
from shiftlab.equivariance.align import make_plan
from shiftlab.errors import ShiftlabError, UsageError
from shiftlab.equivariance.geometry import LayerInfo
from shiftlab.equivariance.metrics import distance

from test_bilinear import explicit_cosine

pytestmark = pytest.mark.skipif(native.status() != "native",
                                reason=f"compiled kernel unavailable: {native.status()}")


def _plan(stride: int, shape: tuple[int, int, int], shifts):
    info = LayerInfo("x", "Test", "spatial", (float(stride),) * 2, (float(stride),) * 2, shape)
    return make_plan(info, torch.tensor(shifts, dtype=torch.float64), "circular", "bilinear")


def _both(plan, ref, shifted):
    """(kernel, eager) statistics of one comparison: the plan rebuilt with each backend."""
    fast = dataclasses.replace(plan, differences=choose("on")).compare(ref, shifted)
    slow = dataclasses.replace(plan, differences=choose("off")).compare(ref, shifted)
    return fast, slow


@settings(max_examples=25, deadline=None)
@given(stride=st.sampled_from([2, 3, 4, 8, 16]), height=st.integers(1, 17),
       width=st.integers(1, 17), channels=st.sampled_from([1, 3, 16, 37]),
       images=st.integers(1, 2), seed=st.integers(0, 2**16), data=st.data())
def test_kernel_equals_the_eager_comparison_on_random_maps(stride, height, width, channels, images,
                                                           seed, data):
    """Small planes with 16 or more channels go channels last, the others block-flat; the shifts
    mix whole feature pixels (difference form) and every phase (cross term)."""
    shifts = data.draw(st.lists(st.tuples(st.integers(-2 * stride, 3 * stride),
                                          st.integers(-2 * stride, 3 * stride)),
                                min_size=1, max_size=7))
    generator = torch.Generator().manual_seed(seed)
    ref = torch.randn(images, channels, height, width, generator=generator)
    shifted = ref[None] + 0.5 * torch.randn(len(shifts), images, channels, height, width,
                                            generator=generator)
    plan = _plan(stride, (channels, height, width), shifts)
    fast, slow = _both(plan, ref, shifted)
    for name in ("ref_sq", "shifted_sq", "diff_sq"):
        got, want = getattr(fast, name), getattr(slow, name)
        scale = float(want.abs().max()) + 1e-12
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=name)


@pytest.mark.parametrize("channels, size", [(20, 9), (3, 21)])  # channels last, block-flat
def test_kernel_matches_explicit_upsampling_for_both_layouts(channels, size):
    stride = 4
    shifts = [(1, 1), (2, 1), (9, 9), (11, 5), (4, 0), (3, 3), (-2, 6)]
    generator = torch.Generator().manual_seed(5)
    ref = torch.randn(2, channels, size, size + 1, generator=generator)
    shifted = ref[None] + 0.5 * torch.randn(len(shifts), 2, channels, size, size + 1,
                                            generator=generator)
    plan = _plan(stride, (channels, size, size + 1), shifts)
    got = distance(plan.compare(ref, shifted), "cosine").numpy()
    np.testing.assert_allclose(got, explicit_cosine(ref, shifted, shifts, stride), rtol=1e-4,
                               atol=2e-6)


@pytest.mark.parametrize("channels, size", [(20, 7), (3, 10), (3, 30)])
def test_kernel_gives_nan_and_inf_where_the_eager_code_does(channels, size):
    shifts = [(1, 1), (2, 1), (4, 0), (8, 8), (3, 3)]
    generator = torch.Generator().manual_seed(3)
    ref = torch.randn(2, channels, size, size, generator=generator)
    shifted = ref[None] + 0.5 * torch.randn(len(shifts), 2, channels, size, size,
                                            generator=generator)
    shifted[1, 0, 0, 2, 3] = math.inf
    shifted[2, 1, 0, 1, 1] = math.nan
    shifted[3, 0, 1 % channels, 0, 0] = -math.inf
    bad_ref = ref.clone()
    bad_ref[1, 0, 3, 3] = math.inf
    plan = _plan(4, (channels, size, size), shifts)
    for reference in (ref, bad_ref):
        fast, slow = _both(plan, reference, shifted)
        a, b = distance(fast, "cosine"), distance(slow, "cosine")
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        finite = torch.isfinite(b)
        assert bool(finite.any())
        np.testing.assert_allclose(a[finite].numpy(), b[finite].numpy(), rtol=1e-4, atol=1e-6)


def test_kernel_reads_any_strides_of_the_shift_and_image_dimensions():
    """A view with the images first (S and B strides swapped) and an expanded reference (stride
    0): same numbers as the eager code, not a copy's."""
    shifts = [(1, 2), (5, 3), (4, 4)]
    generator = torch.Generator().manual_seed(1)
    ref = torch.randn(2, 3, 11, 12, generator=generator)
    stored = torch.randn(2, len(shifts), 3, 11, 12, generator=generator)
    plan = _plan(4, (3, 11, 12), shifts)
    for shifted in (stored.transpose(0, 1), ref[None].expand(len(shifts), -1, -1, -1, -1)):
        assert choose("on").takes(ref, shifted)
        fast, slow = _both(plan, ref, shifted)
        np.testing.assert_allclose(fast.diff_sq.numpy(), slow.diff_sq.numpy(), rtol=1e-5,
                                   atol=1e-5)


def test_kernel_declines_float64_and_planes_that_are_not_contiguous():
    kernel = choose("on")
    ref = torch.randn(1, 2, 6, 6)
    assert kernel.takes(ref, ref[None])
    assert not kernel.takes(ref.double(), ref.double()[None])
    assert not kernel.takes(ref, ref.transpose(-1, -2)[None])


def test_float64_maps_on_the_kernel_backend_take_the_eager_passes_bit_for_bit():
    """What the kernel declines goes to the same eager code as SHIFTLAB_NATIVE=0: identical."""
    generator = torch.Generator().manual_seed(6)
    ref = torch.randn(2, 3, 11, 12, generator=generator, dtype=torch.float64)
    shifted = ref[None] + 0.5 * torch.randn(3, 2, 3, 11, 12, generator=generator,
                                            dtype=torch.float64)
    plan = _plan(4, (3, 11, 12), [(1, 2), (5, 3), (4, 4)])
    fast, slow = _both(plan, ref, shifted)
    for name in ("ref_sq", "shifted_sq", "diff_sq"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name


def test_the_backend_is_chosen_when_the_plan_is_built(monkeypatch):
    """SHIFTLAB_NATIVE is read once, by make_plan: a compare never looks at it again."""
    monkeypatch.setenv("SHIFTLAB_NATIVE", "0")
    eager = _plan(4, (3, 11, 12), [(1, 2)])
    monkeypatch.setenv("SHIFTLAB_NATIVE", "1")
    kernel = _plan(4, (3, 11, 12), [(1, 2)])
    assert (eager.differences.name, kernel.differences.name) == ("eager", "native")
    monkeypatch.setenv("SHIFTLAB_NATIVE", "sometimes")  # not read by compare: no error
    ref = torch.randn(1, 3, 11, 12)
    for plan in (eager, kernel):
        plan.compare(ref, ref[None] + 1.0)


def test_without_openmp_the_kernel_splits_the_work_over_python_threads(monkeypatch):
    """A library built without OpenMP (Apple clang) has no *_parallel entry point: each thread
    takes a range of (image, channel) pairs; the sums are the same."""
    generator = torch.Generator().manual_seed(2)
    ref = torch.randn(2, 5, 9, 9, generator=generator)
    shifted = torch.randn(3, 2, 5, 9, 9, generator=generator)
    lags = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 8)]
    taps = [((0, 0.5), (1, 0.25), (8, 0.25))] * 3
    kernel = native.BilinearKernel(lags, [False, False, True], [(0, 0), (0, 0), (1, 0)],
                                   taps[:2] + [None], taps[:2] + [None])
    with_openmp = kernel(ref, shifted)

    class Serial:  # the library as a build without OpenMP would export it
        shiftlab_bilinear = kernel.library.shiftlab_bilinear

    kernel.library = Serial
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for got, want in zip(kernel(ref, shifted), with_openmp):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-9)


def test_required_kernel_that_cannot_be_built_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    monkeypatch.setenv("SHIFTLAB_NATIVE", "1")
    ref = torch.randn(1, 2, 5, 5)
    plan = _plan(4, (2, 5, 5), [(1, 1)])
    with pytest.raises(ShiftlabError,
                       match="SHIFTLAB_NATIVE=1 but the kernel cannot be built") as info:
        plan.compare(ref, ref[None] + 1.0)
    assert "\n" not in str(info.value)


def test_automatic_mode_falls_back_to_the_eager_code_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("SHIFTLAB_NATIVE", "auto")
    shifts = [(1, 1), (4, 0)]
    ref = torch.randn(1, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    shifted = ref[None] + 0.1
    plan = _plan(4, (2, 9, 9), shifts)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernel is not available"):
        stats = plan.compare(ref, shifted.expand(2, -1, -1, -1, -1).contiguous())
    assert native.status().startswith("eager (kernel not built: no C compiler")
    assert bool(torch.isfinite(stats.diff_sq).all())


def test_an_unknown_native_setting_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("SHIFTLAB_NATIVE", "sometimes")
    with pytest.raises(UsageError, match="SHIFTLAB_NATIVE='sometimes'"):
        _plan(4, (1, 3, 3), [(1, 1)])


def test_the_library_is_built_once_and_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", str(tmp_path / "cache"))
    first = native._build(native._compiler())
    built = first.stat().st_mtime_ns
    assert first.parent == tmp_path / "cache" and first.suffix == ".so"
    assert native._build(native._compiler()) == first and first.stat().st_mtime_ns == built
    assert not stat.S_IMODE(first.parent.stat().st_mode) & 0o022


def test_a_cache_directory_others_can_write_to_is_not_used(tmp_path, monkeypatch):
    """Somebody else's library must never be loaded: a group- or world-writable directory
    (a shared /tmp) is skipped, and the private fallback is used instead."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", str(shared))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "private-tmp"))
    (tmp_path / "private-tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    built = native._build(native._compiler())
    assert shared not in built.parents
    assert built.parent == tmp_path / "private-tmp" / f"shiftlab-{os.getuid()}"
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize("align", ["exact", "fourier"])
@pytest.mark.parametrize("stride, size", [(1, 17), (2, 16), (4, 20)])
def test_difference_kernel_equals_the_eager_exact_and_fourier_comparisons(align, stride, size):
    """Planes of 256 or more positions: every shift of a fraction group (and all whole-pixel
    shifts) in one call, each with its own roll; fractional Fourier sources included."""
    shifts = [(1, 1), (2, 3), (-3, 5), (4, 0), (0, 4), (7, -6), (stride, 2 * stride)]
    generator = torch.Generator().manual_seed(stride)
    ref = torch.randn(2, 3, size, size + 1, generator=generator)
    shifted = torch.roll(ref, (1, 2), dims=(-2, -1))[None] + 0.3 * torch.randn(
        len(shifts), 2, 3, size, size + 1, generator=generator)
    info = LayerInfo("x", "Test", "spatial", (float(stride),) * 2, (float(stride),) * 2,
                     (3, size, size + 1))
    plan = make_plan(info, torch.tensor(shifts, dtype=torch.float64), "circular", align)
    fast, slow = _both(plan, ref, shifted)
    for name in ("ref_sq", "shifted_sq", "diff_sq"):
        got, want = getattr(fast, name), getattr(slow, name)
        assert torch.equal(got.isnan(), want.isnan()), name
        keep = ~want.isnan()
        np.testing.assert_allclose(got[keep].numpy(), want[keep].numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_difference_kernel_gives_zero_for_a_rolled_copy():
    """No cancellation: the difference is formed before it is squared."""
    ref = torch.randn(2, 3, 16, 17, generator=torch.Generator().manual_seed(0))
    for roll in [(0, 0), (1, 0), (0, 1), (2, 3), (-1, -2), (5, -3), (15, 16)]:
        shifted = torch.roll(ref, roll, dims=(-2, -1))[None]
        squares, diff = native.difference_sums(ref, shifted, [0], [roll])
        assert float(diff.abs().max()) == 0.0
        want = shifted.double().square().sum((2, 3, 4))
        np.testing.assert_allclose(squares.numpy(), want.numpy(), rtol=1e-6)


def test_difference_kernel_reads_a_reference_with_gaps_between_rows_and_planes():
    """A Fourier source is one slice of a wider matrix product: (B, C, h, k, w)[..., slot, :]."""
    generator = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 3, 16, 3, 17, generator=generator)
    ref = wide[..., 1, :]
    shifted = torch.randn(2, 2, 3, 16, 17, generator=generator)
    rolls = [(0, 0), (2, -3)]
    got = native.difference_sums(ref, shifted, [0, 1], rolls)
    want = native.difference_sums(ref.contiguous(), shifted, [0, 1], rolls)
    for strided, contiguous in zip(got, want):
        assert torch.equal(strided, contiguous)


def test_one_row_maps_never_read_past_the_end_of_the_tensor(tmp_path):
    """H = 1 on the block-flat layout once read a row past each plane: the maps end exactly at
    a protected page, so a read past them crashes the (separate) process."""
    script = tmp_path / "guard.py"
    script.write_text("""
import ctypes, mmap, sys
import torch
from shiftlab.equivariance.align import make_plan
from shiftlab.equivariance.geometry import LayerInfo
page = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
buffer = mmap.mmap(-1, 2 * page)
base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
assert libc.mprotect(ctypes.c_void_p(base + page), page, 0) == 0
count = 2 * 1 * 4 * 1 * 8
floats = torch.frombuffer(buffer, dtype=torch.float32, count=page // 4)
shifted = floats[page // 4 - count:].view(2, 1, 4, 1, 8)
shifted.copy_(torch.randn(2, 1, 4, 1, 8))
ref = torch.randn(1, 4, 1, 8)
info = LayerInfo("x", "T", "spatial", (2.0, 2.0), (2.0, 2.0), (4, 1, 8))
plan = make_plan(info, torch.tensor([[1.0, 1.0], [2.0, 3.0]], dtype=torch.float64),
                 "circular", "bilinear")
print(float(plan.compare(ref, shifted).diff_sq.sum()))
""")
    env = dict(os.environ, SHIFTLAB_NATIVE="1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert math.isfinite(float(done.stdout.strip().splitlines()[-1]))


def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", str(tmp_path))
    built = native._build(native._compiler())
    built.write_bytes(built.read_bytes()[:100])  # a truncated file, as after a full disk
    monkeypatch.setattr(native, "_state", {})
    assert native.load() is not None
    assert native.status() == "native"
    assert built.stat().st_size > 100


def _fresh_build(tmp_path, monkeypatch):
    """A library built into an empty cache under tmp_path: (its path, its bytes, its inode)."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", str(tmp_path / "cache"))
    library = native._build(native._compiler())
    return library, library.read_bytes(), library.stat().st_ino


def _sound(library) -> bool:
    return build.problem(library, hashlib.sha256(native.SOURCE.read_bytes()).hexdigest()) is None


def test_a_truncated_cached_library_is_built_again_before_it_is_loaded(tmp_path, monkeypatch):
    """dlopen of a truncated library dies of SIGBUS (exit 135, no message) when it maps the
    missing pages: the size and hash are checked before, in a fresh process that loads it."""
    library, data, _ = _fresh_build(tmp_path, monkeypatch)
    os.truncate(library, len(data) // 2)
    script = tmp_path / "use.py"
    script.write_text("""
import torch
from shiftlab.equivariance.kernels import build, native
ref = torch.randn(2, 3, 16, 17)
squares, _ = native.difference_sums(ref, ref[None], [0], [(0, 0)])
print(native.status(), float(squares.sum()))
""")
    env = dict(os.environ, SHIFTLAB_NATIVE="1", SHIFTLAB_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split()[0] == "native"
    assert library.stat().st_size == len(data) and _sound(library)


@pytest.mark.parametrize("damage", ["writable", "flipped byte", "no sidecar", "symlink"])
def test_a_cached_library_that_fails_a_check_is_replaced_not_loaded(tmp_path, monkeypatch,
                                                                    damage):
    """Only a regular file of this user that group and others cannot write, with the size and
    hash recorded when it was built, is used; anything else is compiled again (a new file)."""
    library, data, inode = _fresh_build(tmp_path, monkeypatch)
    if damage == "writable":
        os.chmod(library, 0o777)
    elif damage == "flipped byte":
        library.write_bytes(data[:5000] + bytes([data[5000] ^ 1]) + data[5001:])
    elif damage == "no sidecar":
        build.sidecar(library).unlink()
    else:
        elsewhere = tmp_path / "elsewhere.so"
        os.replace(library, elsewhere)
        library.symlink_to(elsewhere)
    again = native._build(native._compiler())
    assert again == library and not library.is_symlink()
    assert library.stat().st_ino != inode
    assert not stat.S_IMODE(library.stat().st_mode) & 0o022
    assert library.read_bytes() == data and _sound(library)
    assert native.load(required=True) is not None


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root (chown)")
def test_a_cached_library_of_another_user_is_replaced_not_loaded(tmp_path, monkeypatch):
    library, _, inode = _fresh_build(tmp_path, monkeypatch)
    os.chown(library, 65534, 65534)
    assert not _sound(library)
    assert native._build(native._compiler()) == library
    assert library.stat().st_uid == 0 and library.stat().st_ino != inode


def test_a_compiler_that_hangs_is_run_once_then_remembered(tmp_path, monkeypatch):
    """A compiler that never returns is killed with its children after COMPILE_SECONDS, once: later processes take the eager code at once with one warning
    (an error with SHIFTLAB_NATIVE=1) until the marker file is deleted."""
    runs = tmp_path / "runs"
    compiler = tmp_path / "slowcc"
    compiler.write_text(f"#!/bin/sh\necho run >> {runs}\nsleep 60\n")  # sleep: a child
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("SHIFTLAB_CACHE_DIR", str(cache))
    monkeypatch.setenv("SHIFTLAB_NATIVE", "auto")
    monkeypatch.setattr(build, "COMPILE_SECONDS", 1)
    monkeypatch.setattr(native, "_state", {})
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match="ran longer than 1 s") as caught:
        assert native.load() is None
    assert len(caught) == 1 and time.monotonic() - started < 30
    assert runs.read_text().split() == ["run"]
    marker, = cache.glob("*.timeout")
    assert str(compiler) in marker.read_text()

    script = ("from shiftlab import config; from shiftlab.equivariance.kernels import native; "
              "print(native.load(required=config.native_mode() == 'on'))")
    for setting in ("auto", "1"):  # new processes, with the default time limit
        env = dict(os.environ, SHIFTLAB_NATIVE=setting, PYTHONWARNINGS="always")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=60)
        assert f"delete {marker} to try again" in done.stderr
        if setting == "auto":
            assert done.returncode == 0 and done.stdout.strip() == "None"
            assert done.stderr.count("RuntimeWarning") == 1
        else:
            assert done.returncode != 0
            assert "SHIFTLAB_NATIVE=1 but the kernel cannot be built" in done.stderr
    assert runs.read_text().split() == ["run"]  # not run again

    marker.unlink()  # tries again
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(RuntimeWarning, match="ran longer than 1 s"):
        assert native.load() is None
    assert runs.read_text().split() == ["run", "run"]


def test_callers_on_several_threads_share_the_python_thread_pools(monkeypatch):
    """Without OpenMP each call splits over a pool; two threads with different channel counts
    (pools of different sizes) must not shut each other's pool down."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    lags = [(0, 0), (0, 1), (1, 0)]

    def run(channels: int) -> None:
        ref = torch.randn(1, channels, 6, 6)
        kernel = native.BilinearKernel(lags, [True], [(1, 1)], [None], [None])

        class Serial:
            shiftlab_bilinear = kernel.library.shiftlab_bilinear

        kernel.library = Serial
        for _ in range(30):
            kernel(ref, ref[None] + 1.0)

    with ThreadPoolExecutor(2) as callers:
        for future in [callers.submit(run, 3), callers.submit(run, 5)]:
            future.result()


@pytest.mark.parametrize("lag", [(9, 2), (9, 1), (4, 0), (0, 1), (30, 2)])
def test_lag_sums_of_any_lag_equal_numpy(lag):
    """The kernel's lag sums for lags beyond the 3-tap norm's (|l_h| > 1) on both layouts."""
    generator = torch.Generator().manual_seed(4)
    for channels in (3, 17):
        shifted = torch.randn(2, 1, channels, 31, 3, generator=generator)
        kernel = native.BilinearKernel([lag], [False, False], [(0, 0)] * 2, [(), ()], [(), ()])
        sums = kernel(shifted[0], shifted)[0][..., 0]
        want = (shifted.double() * torch.roll(shifted.double(), (-lag[0], -lag[1]),
                                              dims=(-2, -1))).sum((2, 3, 4))
        np.testing.assert_allclose(sums.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_kernel_is_at_least_as_close_to_float64_as_the_eager_steps():
    """Nearly equivariant deep maps: small distances from |a|² + |b|² - 2<a, b>; the kernel's
    sums (float32 over at most 4,096 products, then float64) lose less than the eager ones."""
    generator = torch.Generator().manual_seed(0)
    shifts = [(i, j) for i in range(4) for j in range(4)][1:]
    ref = torch.relu(torch.randn(2, 512, 7, 7, generator=generator))
    shifted = ref[None] + 0.01 * torch.randn(len(shifts), 2, 512, 7, 7, generator=generator)
    plan = _plan(32, (512, 7, 7), shifts)
    truth = distance(dataclasses.replace(plan, differences=choose("off")).compare(
        ref.double(), shifted.double()), "cosine")
    fast, slow = _both(plan, ref, shifted)
    kernel_error = float((distance(fast, "cosine") - truth).abs().max())
    eager_error = float((distance(slow, "cosine") - truth).abs().max())
    assert kernel_error <= eager_error
    assert kernel_error < 1e-6


_CTYPES = {"int": "c_int", "long": "c_long", "int*": "LP_c_int", "float*": "LP_c_float",
           "double*": "LP_c_double"}


def test_every_kernel_entry_point_declares_the_c_signature():
    """The argtypes of every function the library exports match csrc/bilinear.c, parameter by
    parameter: an argument list that drifts from the C code is caught here, not by a crash."""
    source = native.SOURCE.read_text()
    library = native.load(required=True)
    found = re.findall(r"^int (shiftlab_\w+)\((.*?)\)\s*{", source, re.MULTILINE | re.DOTALL)
    assert {name for name, _ in found} >= {"shiftlab_bilinear", "shiftlab_difference"}
    for name, parameters in found:
        function = getattr(library, name, None)
        if function is None:  # a _parallel entry point of a build without OpenMP
            assert name.endswith("_parallel"), name
            continue
        want = []
        for parameter in parameters.split(","):
            words = parameter.replace("*", " * ").split()
            kind = [word for word in words[:-1] if word not in ("const", "restrict")]
            want.append(_CTYPES["".join(kind)])
        assert [kind.__name__ for kind in function.argtypes] == want, name
        assert function.restype is ctypes.c_int, name


_OPENMP = r"/lib(gomp|iomp|omp)[^/]*\.(so|dylib)[^/]*$"


def test_the_process_holds_one_openmp_runtime_after_the_kernel_loads(tmp_path):
    """The kernel's -fopenmp must bind to the OpenMP runtime PyTorch has loaded, not map a
    second copy (two thread pools spinning on the same cores). A fresh process, so that nothing
    loaded earlier hides a second copy."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    script = tmp_path / "openmp.py"
    script.write_text(f"""
import json, os, re
import torch
def runtimes():
    with open("/proc/self/maps") as maps:
        paths = {{line.split()[-1] for line in maps if re.search({_OPENMP!r}, line.strip())}}
    return sorted({{os.path.realpath(path) for path in paths}})
before = runtimes()
from shiftlab.equivariance.kernels import build, native
library = native.load(required=True)
ref = torch.randn(2, 8, 16, 16)
native.difference_sums(ref, ref[None] + 1.0, [0], [(1, 1)])  # start the OpenMP threads
with open("/proc/self/maps") as maps:
    loaded = any(library._name in line for line in maps)
print(json.dumps({{"before": before, "after": runtimes(), "loaded": loaded}}))
""")
    env = dict(os.environ, SHIFTLAB_NATIVE="1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"]
    assert len(report["after"]) <= 1, f"OpenMP runtimes mapped: {report}"
