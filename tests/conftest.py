"""Shared helpers for tltorch's tests: tolerances, seeded inputs in every layout, reference checks,
the CUDA tests' marks and CPU process groups for torch.distributed.

Test files import the helpers with `from conftest import ...` (pytest puts tests/ on sys.path).

Convention: inputs are drawn in float32 from a per-test seeded generator, rounded to the dtype under
test, and the reference is computed in float64 from the *rounded* values, so a test measures only the
kernel's own error (accumulation and the final rounding), never the rounding of its inputs.
"""
import os
import socket
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The thread rule (csrc/cpu/common.c) gives a kernel fewer threads while other processes keep the CPUs
# busy; tests that compare 1 against 2 threads must get the threads they ask for on a busy CI machine. The
# rule's own tests set this variable themselves in subprocesses. Read once, when tltorch._C loads.
os.environ.setdefault("TLTORCH_THREADS_LOAD", "off")

import tltorch  # noqa: E402  (after the variable above)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Largest allowed max|out - ref| / max|ref|, per output dtype. float32 results are limited by float32
# accumulation; bfloat16/float16 results by the one final rounding (unit roundoff 2^-8 and 2^-11).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# Unit roundoff (half an ulp at 1.0) of each dtype.
UNIT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# How far a CUDA result may be from its CPU twin's, relative to max|ref|: in float32 both accumulate in
# float32 (in different orders); in bfloat16/float16 each is about one rounding from the float32 sum,
# so the two are at most ~2 ulps = 4 unit roundoffs apart.
TWIN = {torch.float32: 5e-6, torch.bfloat16: 4 * UNIT[torch.bfloat16],
        torch.float16: 4 * UNIT[torch.float16]}

# 2-D layouts every kernel must read: contiguous, transposed, strided in either dim, offset slices.
LAYOUTS = ("contig", "t", "stride2", "offset", "tstride")


def dtype_id(d):
    return str(d).replace("torch.", "")


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test's id: fixed for a case, different between cases."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def randn(shape, dtype, gen, scale=1.0):
    """Random normal values drawn in float32 and rounded to `dtype` (contiguous)."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def make2d(rows, cols, layout, dtype, gen, scale=1.0):
    """A (rows, cols) tensor of `dtype` stored in `layout` (a view of a bigger buffer when strided)."""
    if layout == "contig":
        t = randn((rows, cols), dtype, gen, scale)
    elif layout == "t":
        t = randn((cols, rows), dtype, gen, scale).t()
    elif layout == "stride2":
        t = randn((rows, 2 * cols), dtype, gen, scale)[:, ::2]
    elif layout == "offset":
        t = randn((rows + 3, cols + 5), dtype, gen, scale)[3:, 5:]
    elif layout == "tstride":
        t = randn((2 * cols + 1, rows), dtype, gen, scale)[1::2].t()
    else:
        raise AssertionError(layout)
    assert t.shape == (rows, cols)
    if layout != "contig" and rows > 1 and cols > 1:
        assert not t.is_contiguous()
    return t


def make_x(lead, D, layout, dtype, gen, scale=1.0):
    """x of shape (*lead, D) in `layout`: contig, strided (every other feature), transposed (.mT of a
    (..., D, T) tensor), offset (a slice starting inside a bigger buffer) or expanded (stride 0)."""
    shape = (*lead, D)
    if layout == "contig" or len(lead) == 0:
        return randn(shape, dtype, gen, scale)
    if layout == "strided":
        return randn((*lead, 2 * D), dtype, gen, scale)[..., ::2]
    if layout == "transposed":
        return randn((*lead[:-1], D, lead[-1]), dtype, gen, scale).mT
    if layout == "offset":
        return randn((*lead[:-1], lead[-1] + 2, D + 1), dtype, gen, scale)[..., 2:, 1:]
    if layout == "expanded":  # one row repeated: stride 0 between rows
        return randn((*lead[:-1], 1, D), dtype, gen, scale).expand(shape)
    raise AssertionError(layout)


def empty2d(rows, cols, layout, dtype, fill=float("nan")):
    """An output buffer of (rows, cols) in `layout`, filled with `fill` (NaN: must be written)."""
    if layout == "contig":
        t = torch.empty(rows, cols, dtype=dtype)
    elif layout == "t":
        t = torch.empty(cols, rows, dtype=dtype).t()
    elif layout == "stride2":
        t = torch.empty(rows, 2 * cols, dtype=dtype)[:, ::2]
    elif layout == "offset":
        t = torch.empty(rows + 2, cols + 3, dtype=dtype)[2:, 3:]
    else:
        raise AssertionError(layout)
    t.fill_(fill)
    return t


def ref_gemm(a, b, c0, bias, alpha, beta):
    """alpha a b + beta c0 + bias in float64 (c0 not read when beta is 0)."""
    r = alpha * (a.double() @ b.double())
    if beta != 0:
        r = r + beta * c0.double()
    if bias is not None:
        r = r + bias.double()
    return r


def rel_err(out, ref):
    """max|out - ref| / max|ref| in float64 (0 for empty tensors; inf if out has NaN/inf)."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if ref.numel() == 0:
        return 0.0
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close(out, ref, dtype, torch_out=None, what=""):
    """`out` (of output dtype `dtype`) is within TOL[dtype] of the float64 `ref`. When `torch_out`,
    torch's own result on the same rounded inputs, is given and `dtype` is bfloat16/float16, the
    kernel's error may also be at most about twice torch's plus one rounding: no worse than the
    framework it replaces. (In float32 torch sums pairwise and the kernels in order, so there TOL,
    a bound on float32 accumulation, is the measure.)"""
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.3g} ({dtype_id(dtype)})"
    if torch_out is not None and dtype in LOW_PRECISION:
        terr = rel_err(torch_out, ref)
        bound = 2 * terr + UNIT[dtype]
        assert err <= bound, f"{what}: relative error {err:.3g} vs torch's {terr:.3g} ({dtype_id(dtype)})"
    return err


def assert_rounded_once(out, ref, dtype, what=""):
    """Elementwise: |out - ref| <= UNIT*|ref| + small, i.e. the float32 sum was rounded to `dtype` once
    (rounding partial sums between K blocks would break this for the smaller elements)."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    slack = 1e-5 * ref64.abs().max().item()
    bad = (out64 - ref64).abs() > UNIT[dtype] * ref64.abs() + slack
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements are off by more than "
                           f"one rounding to {dtype_id(dtype)}")


def names_arg(excinfo, name):
    """The exception message names argument `name` the way tltorch._C does: argument 'name'."""
    msg = str(excinfo.value)
    assert f"'{name}'" in msg, f"message does not name '{name}': {msg}"


def dropout_keep_mask(seed, rows, cols, p):
    """csrc/tl.h's dropout rule, written out independently of the kernels: element (i, k) of a (rows, cols)
    input is kept iff tl_dropout_hash(seed, i * cols + k) >= tl_dropout_threshold((float)p)."""
    with np.errstate(over="ignore"):
        idx = np.arange(rows * cols, dtype=np.uint64)
        z = np.uint64(seed) + (idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = (z ^ (z >> np.uint64(31))) >> np.uint64(32)
    t = float(np.float32(p)) * 4294967296.0
    thr = 0 if t <= 0 else 4294967295 if t >= 4294967295.0 else int(t)
    return torch.from_numpy(h >= np.uint64(thr)).reshape(rows, cols)


# ---- the CUDA twins' tests ------------------------------------------------------------------------------

def gpu_marks(have_gpu, *fixtures):
    """A decorator for the tests that run a CUDA kernel: marked `cuda`, skipped unless `have_gpu`, run with
    the named `fixtures` in use."""
    def mark(f):
        f = pytest.mark.skipif(not have_gpu, reason="needs a CUDA GPU and tltorch._cuda")(pytest.mark.cuda(f))
        return pytest.mark.usefixtures(*fixtures)(f) if fixtures else f
    return mark


def host(t):
    """t on the CPU (None stays None)."""
    return None if t is None else t.to("cpu")


INFO = tltorch.backend_info()
HAVE_GPU = torch.cuda.is_available() and INFO["cuda_available"]


@pytest.fixture
def no_tf32():
    """Full float32 products on the GPU (TF32 would be ~1e-3), restored afterwards."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def to_cuda(t):
    """t's values on the GPU in exactly t's layout (strides and storage offset), via its storage."""
    if t is None:
        return None
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,))
    return flat.cuda().as_strided(t.shape, t.stride(), t.storage_offset())


def assert_twin(out_cuda, out_cpu, ref, dtype, what=""):
    """The CUDA result is within TOL of the float64 reference and within TWIN of its CPU twin."""
    assert out_cuda.is_cuda and not out_cpu.is_cuda and out_cuda.dtype == out_cpu.dtype
    assert_close(out_cuda, ref, dtype, what=f"{what} (cuda vs float64)")
    if ref.numel():
        scale = ref.abs().max().item() or 1.0
        d = (out_cuda.detach().cpu().double() - out_cpu.detach().double()).abs().max().item() / scale
        assert d <= TWIN[dtype], f"{what}: cuda and cpu differ by {d:.3g} > {TWIN[dtype]:.3g}"


# ---- torch.distributed ----------------------------------------------------------------------------------

def run_ranks(worker, world, folder, *args):
    """worker(rank, *args) in `world` spawned CPU processes joined in one gloo process group (one thread
    each), and what each call returned, in rank order (handed back in files rank<r>.pt in `folder`).
    `worker` must be a module-level function: the spawned processes import it."""
    folder = os.fspath(folder)
    mp.spawn(_rank_main, args=(worker, world, _free_port(), folder, args), nprocs=world, join=True)
    return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(world)]


def _rank_main(rank, worker, world, port, folder, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(worker(rank, *args), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
