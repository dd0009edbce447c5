"""The pooling kernel on CUDA (tltorch._cuda.pool) against a float64 reference and its CPU twin
(tltorch._C.pool, the same inputs in the same layouts): every mode, every mask dtype, strided and
transposed hidden states, rows with no counted token, more rows than a grid's y dimension, empty batches.
cls and max copy values, so they are exact; mean sums in float32 in token order, within conftest.TOL of
float64. Both kernels do the same float32 operations in the same order, so the CUDA result equals the
CPU's bit for bit.

Tests marked `cuda` need a GPU and skip otherwise; the argument checks at the end need only the built
extension. Kernels are reached through kernels() and inputs moved with on_device(), nothing else."""
import pytest
import torch

from conftest import (DTYPES, HAVE_GPU, INFO, TOL, dtype_id, gpu_marks, host, names_arg, randn, rel_err,
                      to_cuda as on_device)
from tltorch import _C, ops

NAN = float("nan")
DEVICE = "cuda"
gpu_test = gpu_marks(HAVE_GPU)


def kernels():
    return ops.cuda_module()


# ---- pooling ------------------------------------------------------------------------------------------

MODES = {"cls": 0, "mean": 1, "max": 2}


def make3d(B, T, D, layout, dtype, gen):
    """A (B, T, D) tensor of `dtype` in `layout` (a view of a bigger or permuted buffer when strided)."""
    if layout == "contig":
        h = randn((B, T, D), dtype, gen)
    elif layout == "transposed":  # features-major: a (B, D, T) activation transposed
        h = randn((B, D, T), dtype, gen).transpose(1, 2)
    elif layout == "batch_inner":  # sequence-first (T, B, D) storage
        h = randn((T, B, D), dtype, gen).transpose(0, 1)
    elif layout == "offset":
        h = randn((B + 1, T + 2, D + 3), dtype, gen)[1:, 2:, 3:]
    elif layout == "stride2":
        h = randn((B, T, 2 * D), dtype, gen)[:, :, ::2]
    else:
        raise AssertionError(layout)
    assert h.shape == (B, T, D)
    return h


def make_mask(B, T, kind, dtype, gen):
    """A (B, T) mask of `kind`: about 60% of the tokens count (with several nonzero values, all of which
    count); row 1, when there is one, has none."""
    if kind == "none":
        return None
    keep = torch.rand(B, T, generator=gen) < 0.6
    if B > 1:
        keep[1] = False
    vals = torch.randint(1, 4, (B, T), generator=gen) * keep
    if kind == "uint8":
        return keep.to(torch.uint8)
    if kind == "int32":
        return vals.to(torch.int32)
    if kind == "int64":
        return vals
    if kind == "hidden_dtype":
        return (vals * 0.5).to(dtype)
    if kind == "strided_int64":
        return torch.zeros(T, 2 * B, dtype=torch.int64).t()[::2].copy_(vals)
    raise AssertionError(kind)


def pool_reference(h, mask, mode):
    """float64: (B, D)."""
    hd = h.double()
    if mode == "cls":
        return hd[:, 0]
    if h.shape[1] == 0:
        return hd.new_zeros(h.shape[0], h.shape[2])
    on = torch.ones(h.shape[:2], dtype=torch.bool) if mask is None else mask != 0
    any_on = on.any(1, keepdim=True)
    if mode == "mean":
        cnt = on.sum(1, keepdim=True).double()
        s = (hd * on[..., None]).sum(1)
        return torch.where(any_on, s / cnt.clamp_min(1), torch.zeros(()).double())
    mx = hd.masked_fill(~on[..., None], float("-inf")).amax(1)
    return torch.where(any_on, mx, torch.zeros(()).double())


def pool_both(h, mask, mode, out_dtype):
    """The CUDA and CPU kernels on the same inputs: (gpu result on the host, cpu result)."""
    B, D = h.shape[0], h.shape[2]
    out = torch.full((B, D), NAN, dtype=out_dtype, device=DEVICE)
    kernels().pool(on_device(h), on_device(mask), MODES[mode], out)
    out_cpu = torch.full((B, D), NAN, dtype=out_dtype)
    _C.pool(h, mask, MODES[mode], out_cpu, 0)
    return host(out), out_cpu


MASKS = ("none", "uint8", "int32", "int64", "hidden_dtype", "strided_int64")
LAYOUTS3 = ("contig", "transposed", "batch_inner", "offset", "stride2")


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("mode", list(MODES))
def test_cuda_pool(mode, mask_kind, dtype, gen):
    k = MASKS.index(mask_kind)
    layout = LAYOUTS3[k % len(LAYOUTS3)]
    out_dtype = torch.float32 if k % 2 else dtype
    B, T, D = 7, 13, 300  # D over one block of threads
    h = make3d(B, T, D, layout, dtype, gen)
    mask = make_mask(B, T, mask_kind, dtype, gen)
    got, cpu = pool_both(h, mask, mode, out_dtype)
    ref = pool_reference(h, mask, mode)
    what = f"{mode} {mask_kind} {layout} -> {dtype_id(out_dtype)}"
    if mode == "mean":
        err = rel_err(got, ref)
        assert err <= TOL[out_dtype], f"{what}: relative error {err:.3g}"
    else:
        assert torch.equal(got, ref.to(out_dtype)), f"{what}: not the selected values"
    if mask is not None and B > 1 and mode != "cls":
        assert (got[1] == 0).all(), f"{what}: a row with no counted token is not zero"
    assert torch.equal(got, cpu), f"{what}: cuda and cpu differ"


@gpu_test
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(0, 5, 4), (3, 0, 4), (3, 5, 0), (2, 1, 3), (70000, 2, 3), (2, 300, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_pool_shapes(shape, mode, gen):
    """Empty batches, no tokens (cls: a ValueError), no features, one token, more rows than a grid's y
    dimension (65535), long sequences."""
    B, T, D = shape
    h = make3d(B, T, D, "contig", torch.float32, gen)
    mask = make_mask(B, T, "uint8", torch.float32, gen) if T else None
    if mode == "cls" and T == 0 and B * D > 0:
        out = torch.full((B, D), NAN, device=DEVICE)
        with pytest.raises(ValueError) as ei:
            kernels().pool(on_device(h), None, MODES[mode], out)
        names_arg(ei, "h")
        assert torch.isnan(host(out)).all()
        return
    got, cpu = pool_both(h, mask, mode, torch.float32)
    ref = pool_reference(h, mask, mode)
    assert rel_err(got, ref) <= TOL[torch.float32]
    assert torch.equal(got, cpu)


@gpu_test
def test_cuda_pool_nan():
    """max propagates the NaN of a counted token, as torch.amax does; a masked-out token is never read."""
    h = torch.randn(2, 4, 3)
    h[0, 1, 2] = NAN
    h[1, 3, 0] = NAN
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.uint8)
    for mode in ("max", "mean"):
        got, cpu = pool_both(h, mask, mode, torch.float32)
        assert torch.isnan(got[0, 2]) and not torch.isnan(got[0, :2]).any() and not torch.isnan(got[1]).any()
        assert torch.equal(got.nan_to_num(), cpu.nan_to_num()) and torch.equal(got.isnan(), cpu.isnan())


# ---- the binding's argument checks (the built extension, with or without a GPU) -------------------------

@pytest.mark.skipif(not INFO["cuda_built"], reason="tltorch._cuda is not built")
def test_cuda_pool_arguments_checked_without_a_gpu():
    """mode is checked first (no GPU needed to see it), then CPU tensors are refused by name."""
    K = ops.cuda_module()
    h, out = torch.randn(2, 3, 4), torch.zeros(2, 4)
    for mode in (3, -1):
        with pytest.raises(ValueError) as ei:
            K.pool(h, None, mode, out)
        names_arg(ei, "mode")
    with pytest.raises(ValueError) as ei:
        K.pool(h, None, 1, out)
    names_arg(ei, "h")
    assert torch.equal(out, torch.zeros(2, 4))
