"""tltorch.functional.pool (and tltorch._C.pool under it) against a float64 reference: every mode, every
mask dtype, strided and transposed hidden states, rows with no counted token, T == 1, empty batches;
thread-count independence, NaN handling, the torch.library op, and argument errors. The CUDA twin is
compared with the CPU at the end (marked `cuda`)."""
import pytest
import torch

from conftest import DTYPES, LOW_PRECISION, TOL, assert_close, dtype_id, names_arg, randn
from tltorch import _C, ops
from tltorch.functional import pool

MODES = ("cls", "mean", "max")
LAYOUTS3 = ("contig", "transposed", "stride2", "batch_inner", "offset")
MASKS = ("none", "bool", "uint8", "int32", "int64", "hidden_dtype", "float64", "strided_int64")


def make3d(B, T, D, layout, dtype, gen):
    """A (B, T, D) tensor of `dtype` in `layout` (a view of a bigger or permuted buffer when strided)."""
    if layout == "contig":
        h = randn((B, T, D), dtype, gen)
    elif layout == "transposed":  # features-major, as a (B, D, T) activation transposed
        h = randn((B, D, T), dtype, gen).transpose(1, 2)
    elif layout == "stride2":
        h = randn((B, T, 2 * D), dtype, gen)[:, :, ::2]
    elif layout == "batch_inner":  # sequence-first (T, B, D) storage
        h = randn((T, B, D), dtype, gen).transpose(0, 1)
    elif layout == "offset":
        h = randn((B + 1, T + 2, D + 3), dtype, gen)[1:, 2:, 3:]
    else:
        raise AssertionError(layout)
    assert h.shape == (B, T, D)
    return h


def make_mask(B, T, kind, dtype, gen):
    """A (B, T) mask of `kind` with values 0 and several nonzeros (a token counts where it is nonzero,
    whatever the value); row 1, when there is one, has no counted token."""
    if kind == "none":
        return None
    keep = torch.rand(B, T, generator=gen) < 0.6
    if B > 1:
        keep[1] = False
    if B > 2 and T > 0:
        keep[2] = True
    vals = torch.randint(1, 4, (B, T), generator=gen)  # nonzero values 1..3
    if kind == "bool":
        return keep
    if kind in ("uint8", "int32", "int64"):
        return (keep * vals).to(getattr(torch, kind))
    if kind == "hidden_dtype":
        return (keep * vals * 0.5).to(dtype)
    if kind == "float64":
        return (keep * vals * -0.25).double()
    if kind == "strided_int64":
        return (keep * vals).t().contiguous().t()  # (B, T) with unit stride in dim 0
    raise AssertionError(kind)


def ref_pool(h, mask, mode):
    """float64 reference of pool(h, mask, mode) from h's (rounded) values."""
    h64 = h.double()
    B, T, D = h.shape
    if mode == "cls":
        return h64[:, 0]
    keep = torch.ones(B, T, dtype=torch.bool) if mask is None else mask != 0
    any_tok = keep.any(1, keepdim=True)
    if mode == "mean":
        cnt = keep.sum(1, keepdim=True).double()
        s = torch.where(keep[..., None], h64, 0.0).sum(1)
        return torch.where(any_tok, s / cnt.clamp_min(1), 0.0)
    if T == 0:
        return torch.zeros(B, D, dtype=torch.float64)
    m = h64.masked_fill(~keep[..., None], float("-inf")).amax(1)
    return torch.where(any_tok, m, 0.0)


def check(out, ref, mode, dtype, what=""):
    assert out.dtype == dtype and out.shape == ref.shape
    if mode == "mean":
        assert_close(out, ref, dtype, what=what)
    else:  # a copy of one input element: exact
        assert torch.equal(out.double(), ref), f"{what}: {mode} is not exact"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS3)
@pytest.mark.parametrize("mode", MODES)
def test_pool_layouts(mode, layout, dtype, gen):
    h = make3d(5, 13, 37, layout, dtype, gen)
    mask = make_mask(5, 13, "int64", dtype, gen)
    with torch.inference_mode():
        out = pool(h, mask, mode)
    check(out, ref_pool(h, mask, mode), mode, dtype, f"{mode} {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("mode", MODES)
def test_pool_mask_dtypes(mode, kind, dtype, gen):
    h = make3d(4, 9, 21, "transposed", dtype, gen)
    mask = make_mask(4, 9, kind, dtype, gen)
    out = pool(h, mask, mode)
    ref = ref_pool(h, mask, mode)
    check(out, ref, mode, dtype, f"{mode} mask {kind}")
    if mask is not None and mode != "cls":
        assert torch.equal(out[1], torch.zeros_like(out[1])), "a row with no counted token must be zeros"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,T,D", [(1, 1, 1), (3, 1, 17), (0, 5, 7), (4, 6, 0), (7, 2, 300), (2, 40, 257)])
def test_pool_shapes(B, T, D, mode, dtype, gen):
    h = make3d(B, T, D, "stride2", dtype, gen)
    for kind in ("none", "bool"):
        mask = make_mask(B, T, kind, dtype, gen)
        out = pool(h, mask, mode)
        assert out.shape == (B, D)
        check(out, ref_pool(h, mask, mode), mode, dtype, f"{mode} {B}x{T}x{D} {kind}")


@pytest.mark.parametrize("mode", ("mean", "max"))
def test_pool_no_tokens_gives_zeros(mode):
    h = torch.randn(3, 0, 5)
    assert torch.equal(pool(h, None, mode), torch.zeros(3, 5))
    h = torch.randn(3, 4, 5)
    assert torch.equal(pool(h, torch.zeros(3, 4, dtype=torch.int32), mode), torch.zeros(3, 5))


def test_pool_cls_ignores_mask(gen):
    h = randn((3, 4, 6), torch.float32, gen)
    assert torch.equal(pool(h, torch.zeros(3, 4, dtype=torch.bool), "cls"), h[:, 0])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
def test_pool_float32_out(mode, dtype, gen):
    """The kernel also writes a float32 output for bfloat16/float16 hidden states (the mean unrounded)."""
    h = make3d(3, 11, 19, "offset", dtype, gen)
    mask = make_mask(3, 11, "uint8", dtype, gen)
    out = torch.full((19, 3), float("nan")).t()  # a transposed output
    _C.pool(h, mask, ops.POOL_MODES[mode], out, 1)
    check(out, ref_pool(h, mask, mode), mode, torch.float32, f"{mode} float32 out")


@pytest.mark.parametrize("mode", MODES)
def test_pool_threads_do_not_change_the_result(mode, gen):
    """Large enough to be split between threads (B*T*D > 64K): the same bits with 1, 2 and 3 threads."""
    h = make3d(5, 70, 301, "transposed", torch.float32, gen)
    mask = make_mask(5, 70, "int32", torch.float32, gen)
    outs = []
    for nt in (1, 2, 3):
        out = torch.empty(5, 301)
        _C.pool(h, mask, ops.POOL_MODES[mode], out, nt)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    check(outs[0], ref_pool(h, mask, mode), mode, torch.float32, mode)


def test_pool_nan():
    """max propagates a NaN of a counted token, as torch.amax does; a masked-out token is never read
    (mean and max ignore its NaN, where (h * mask).sum() would not)."""
    h = torch.randn(2, 4, 3)
    h[0, 1, 2] = float("nan")
    h[1, 3, 0] = float("nan")
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]])
    mx = pool(h, mask, "max")
    assert torch.isnan(mx[0, 2]) and not torch.isnan(mx[0, :2]).any() and not torch.isnan(mx[1]).any()
    mean = pool(h, mask, "mean")
    assert torch.isnan(mean[0, 2]) and not torch.isnan(mean[1]).any()
    assert_close(mean[1], h[1, :3].double().mean(0), torch.float32)


def test_pool_negative_view(gen):
    """A lazily negated view (torch's neg bit) is materialised before it crosses into C."""
    h = randn((2, 5, 7), torch.float32, gen)
    nv = torch._neg_view(h)
    assert nv.is_neg()
    assert torch.equal(pool(nv, None, "mean"), pool(h.neg(), None, "mean"))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_pool(mode, gen):
    h = make3d(3, 5, 7, "transposed", torch.float32, gen)
    for mask in (None, make_mask(3, 5, "int64", torch.float32, gen)):
        torch.library.opcheck(torch.ops.tltorch.pool.default, (h, mask, ops.POOL_MODES[mode]))


def test_pool_meta_and_compile(gen):
    """On meta tensors the fake kernel answers; under torch.compile the op is traced in one graph."""
    out = pool(torch.empty(3, 5, 7, device="meta", dtype=torch.bfloat16), None, "max")
    assert out.device.type == "meta" and out.shape == (3, 7) and out.dtype == torch.bfloat16
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(h, m):
        return pool(h, m, "mean") * 2.0

    h = make3d(4, 6, 9, "contig", torch.float32, gen)
    m = make_mask(4, 6, "bool", torch.float32, gen)
    assert_close(f(h, m), 2.0 * ref_pool(h, m, "mean"), torch.float32)


def test_pool_refuses_to_drop_gradients(gen):
    h = randn((2, 3, 4), torch.float32, gen).requires_grad_()
    with pytest.raises(RuntimeError, match="gradient"):
        pool(h, None, "mean")
    with torch.no_grad():
        assert_close(pool(h, None, "mean"), ref_pool(h.detach(), None, "mean"), torch.float32)


# ---- bad arguments ------------------------------------------------------------------------------------

H = torch.randn(2, 3, 4)


@pytest.mark.parametrize("args,exc,name", [
    (([[1.0]], None, "mean"), TypeError, "hidden"),
    ((H.double(), None, "mean"), TypeError, "hidden"),
    ((H.long(), None, "mean"), TypeError, "hidden"),
    ((H[0], None, "mean"), ValueError, "hidden"),
    ((H[None], None, "mean"), ValueError, "hidden"),
    ((H, [[1, 1, 1]] * 2, "mean"), TypeError, "attention_mask"),
    ((H, torch.ones(2, 4), "mean"), ValueError, "attention_mask"),
    ((H, torch.ones(3, 3), "max"), ValueError, "attention_mask"),
    ((H, torch.ones(2, 3, 1), "mean"), ValueError, "attention_mask"),
    ((H, torch.ones(2, 3, dtype=torch.complex64), "mean"), TypeError, "attention_mask"),
    ((H, None, "sum"), ValueError, "mode"),
    ((H, None, 1), ValueError, "mode"),
    ((H, None, None), ValueError, "mode"),
    ((torch.randn(2, 0, 4), None, "cls"), ValueError, "hidden"),
], ids=lambda v: None)
def test_pool_bad_arguments(args, exc, name):
    with pytest.raises(exc) as e:
        pool(*args)
    assert name in str(e.value), str(e.value)


def _c_bad_cases():
    h = torch.randn(2, 3, 4)
    out = torch.empty(2, 4)
    big = torch.empty(2, 3, 4)
    return [
        ("h not a tensor", ([1.0], None, 1, out, 1), TypeError, "h"),
        ("h 2-D", (h[0], None, 1, out, 1), ValueError, "h"),
        ("h int", (h.int(), None, 1, out, 1), TypeError, "h"),
        ("mask float64", (h, torch.ones(2, 3, dtype=torch.float64), 1, out, 1), TypeError, "mask"),
        ("mask int8", (h, torch.ones(2, 3, dtype=torch.int8), 1, out, 1), TypeError, "mask"),
        ("mask shape", (h, torch.ones(2, 4, dtype=torch.int64), 1, out, 1), ValueError, "mask"),
        ("mask 1-D", (h, torch.ones(6, dtype=torch.int64), 1, out, 1), ValueError, "mask"),
        ("out shape", (h, None, 1, torch.empty(2, 3), 1), ValueError, "out"),
        ("out dtype", (h, None, 1, torch.empty(2, 4, dtype=torch.float16), 1), TypeError, "out"),
        ("out broadcast", (h, None, 1, torch.empty(1, 4).expand(2, 4), 1), ValueError, "out"),
        ("out inside h", (big, None, 1, big[:, 0], 1), ValueError, "out"),
        ("mode 3", (h, None, 3, out, 1), ValueError, "mode"),
        ("mode str", (h, None, "mean", out, 1), TypeError, "mode"),
        ("cls no tokens", (torch.randn(2, 0, 4), None, 0, out, 1), ValueError, "h"),
        ("nthreads", (h, None, 1, out, "2"), TypeError, "nthreads"),
    ]


@pytest.mark.parametrize("case", _c_bad_cases(), ids=lambda c: c[0])
def test_c_pool_bad_arguments(case):
    _, args, exc, name = case
    with pytest.raises(exc) as e:
        _C.pool(*args)
    names_arg(e, name)


def test_c_pool_arity():
    with pytest.raises(TypeError, match="pool"):
        _C.pool(H, None, 1, torch.empty(2, 4))


# ---- CUDA twin ----------------------------------------------------------------------------------------

HAVE_GPU = torch.cuda.is_available() and ops.cuda_built()


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU and tltorch._cuda")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ("none", "bool", "int32", "hidden_dtype"))
@pytest.mark.parametrize("mode", MODES)
def test_cuda_pool_matches_cpu(mode, kind, dtype, gen):
    h = make3d(5, 33, 300, "transposed", dtype, gen)
    mask = make_mask(5, 33, kind, dtype, gen)
    cpu = pool(h, mask, mode)
    gpu = pool(h.cuda(), None if mask is None else mask.cuda(), mode)
    ref = ref_pool(h, mask, mode)
    assert gpu.is_cuda
    check(gpu.cpu(), ref, mode, dtype, f"cuda {mode}")
    scale = ref.abs().max().item() or 1.0
    assert (gpu.cpu().double() - cpu.double()).abs().max().item() / scale <= TOL[dtype]
