"""tltorch.functional.linear: forward and gradients against float64 torch, the torch.library ops
(tltorch::linear, tltorch::linear_backward) under opcheck and torch.compile, argument errors, and
tltorch.backend_info()."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import tltorch
from conftest import DTYPES, assert_close, dtype_id, make2d, make_x, randn
from tltorch import _C
from tltorch.functional import linear

KC = _C.GEMM_KC


def make_w(N, K, layout, dtype, gen):
    return make2d(N, K, {"contig": "contig", "t": "t", "strided": "stride2"}[layout], dtype, gen)


def linear_leaves(lead, K, N, dtype, gen, x_layout="contig", w_layout="contig"):
    """x (*lead, K), w (N, K) and b (N,), drawn in that order, each a leaf that requires grad."""
    x = make_x(lead, K, x_layout, dtype, gen).requires_grad_()
    w = make_w(N, K, w_layout, dtype, gen).requires_grad_()
    b = randn((N,), dtype, gen).requires_grad_()
    return x, w, b


def ref_linear(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# ---- forward ------------------------------------------------------------------------------------------

# (leading dims of x, in_features K, out_features N)
FWD_SHAPES = [((), 7, 33), ((1,), 1, 1), ((7,), 33, 7), ((3, 5), 33, 17), ((2, 3, 4), 9, 5),
              ((13,), 1000, 11), ((3, 401), 70, 333)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_layout,w_layout", [("contig", "contig"), ("strided", "t"),
                                               ("transposed", "strided"), ("offset", "contig")])
@pytest.mark.parametrize("lead,K,N", FWD_SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_linear_forward(lead, K, N, x_layout, w_layout, with_bias, dtype, gen):
    x = make_x(lead, K, x_layout, dtype, gen)
    w = make_w(N, K, w_layout, dtype, gen)
    b = randn((N,), dtype, gen) if with_bias else None
    y = linear(x, w, b)
    assert y.shape == (*lead, N) and y.dtype == dtype and y.device == x.device
    assert y.grad_fn is None
    assert_close(y, ref_linear(x, w, b), dtype, torch_out=F.linear(x, w, b),
                 what=f"linear {lead} {K}->{N} {x_layout}/{w_layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
def test_linear_empty_batch(lead, dtype, gen):
    K, N = 7, 5
    x, w, b = linear_leaves(lead, K, N, dtype, gen)
    y = linear(x, w, b)
    assert y.shape == (*lead, N)
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=str)
def test_linear_zero_in_features(lead, dtype, gen):
    """K = 0: y is the bias (F.linear agrees); the gradients are empty, or zero for the bias."""
    x, w, b = linear_leaves(lead, 0, 4, dtype, gen)
    y = linear(x, w, b)
    assert torch.equal(y, F.linear(x, w, b))
    g = randn(y.shape, dtype, gen)
    y.backward(g)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert_close(b.grad, g.double().reshape(-1, 4).sum(0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=str)
def test_linear_zero_out_features(lead, dtype, gen):
    x, w, b = linear_leaves(lead, 6, 0, dtype, gen)
    y = linear(x, w, b)
    assert y.shape == (*lead, 0)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert w.grad.shape == (0, 6) and b.grad.shape == (0,)


def test_linear_parameter_and_no_grad(gen):
    x = torch.randn(4, 6, generator=gen, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(3, 6, generator=gen))
    with torch.no_grad():
        y = linear(x, w)
    assert y.grad_fn is None and not y.requires_grad
    y2 = linear(x, w)
    assert y2.requires_grad
    assert torch.equal(y, y2.detach())  # the same kernel either way
    assert_close(y, ref_linear(x, w, None), torch.float32)


# ---- gradients ----------------------------------------------------------------------------------------

def check_grads(x, w, b, g, dtype, what):
    """Run linear forward + backward(g) and compare each gradient with float64 autograd on the same
    (rounded) values; inputs that do not require grad must get none."""
    y = linear(x, w, b)
    y.backward(g)
    xd = x.detach().double().requires_grad_(x.requires_grad)
    wd = w.detach().double().requires_grad_(w.requires_grad)
    bd = None if b is None else b.detach().double().requires_grad_(b.requires_grad)
    yd = F.linear(xd, wd, bd)
    yd.backward(g.double())
    assert_close(y, yd, dtype, what=f"{what} y")
    for name, t, td in (("x", x, xd), ("weight", w, wd), ("bias", b, bd)):
        if t is None:
            continue
        if t.requires_grad:
            assert t.grad is not None, f"{what}: {name}.grad is None"
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            assert_close(t.grad, td.grad, dtype, what=f"{what} d{name}")
        else:
            assert t.grad is None, f"{what}: {name} does not require grad but got one"


GRAD_FLAGS = [f for f in itertools.product([True, False], repeat=3) if any(f)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("flags", GRAD_FLAGS, ids=lambda f: "".join("xwb"[i] for i in range(3) if f[i]))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_grads_each_only_when_required(flags, with_bias, dtype, gen):
    rx, rw, rb = flags
    if not with_bias and not (rx or rw):
        pytest.skip("nothing requires grad")
    x = make_x((3, 5), 33, "strided", dtype, gen).requires_grad_(rx)
    w = make_w(17, 33, "t", dtype, gen).requires_grad_(rw)
    b = randn((17,), dtype, gen).requires_grad_(rb) if with_bias else None
    g = randn((3, 5, 17), dtype, gen)
    check_grads(x, w, b, g, dtype, f"flags={flags}")


# (leading dims, K, N, x layout, w layout)
GRAD_CASES = [
    ((), 7, 33, "contig", "contig"),
    ((1,), 1, 1, "contig", "t"),
    ((7,), 33, 7, "transposed", "strided"),
    ((2, 3, 4), 9, 5, "offset", "contig"),
    ((2, 3, 4), 9, 5, "transposed", "t"),
    ((2, 500), 33, 17, "strided", "contig"),  # batch 1000 > GEMM_KC: the weight gradient's K
    ((13,), 1000, 11, "contig", "t"),  # in_features > GEMM_KC: the forward's K
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("lead,K,N,xl,wl", GRAD_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_linear_grads_shapes_and_layouts(lead, K, N, xl, wl, dtype, gen):
    x, w, b = linear_leaves(lead, K, N, dtype, gen, xl, wl)
    g = randn((*lead, N), dtype, gen)
    check_grads(x, w, b, g, dtype, f"{lead} {K}->{N} {xl}/{wl}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_linear_grads_with_noncontiguous_upstream(dtype, gen):
    """Upstream gradients that are expanded (from .sum()) or strided (from a slice of y)."""
    x, w, b = linear_leaves((4, 6), 9, 10, dtype, gen)
    linear(x, w, b).sum().backward()
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.linear(xd, wd, bd).sum().backward()
    for t, td in ((x, xd), (w, wd), (b, bd)):
        assert_close(t.grad, td.grad, dtype, what="sum()")
        t.grad = None
    linear(x, w, b)[:, ::2, 1::3].sum().backward()
    for t in (xd, wd, bd):
        t.grad = None
    F.linear(xd, wd, bd)[:, ::2, 1::3].sum().backward()
    for t, td in ((x, xd), (w, wd), (b, bd)):
        assert_close(t.grad, td.grad, dtype, what="slice")


# ---- the torch.library ops ----------------------------------------------------------------------------

def test_linear_on_meta_tensors_uses_the_fake_kernel():
    x = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    w = torch.empty(5, 8, device="meta", requires_grad=True)
    b = torch.empty(5, device="meta", requires_grad=True)
    y = linear(x, w, b)
    assert y.device.type == "meta" and y.shape == (2, 3, 5) and y.dtype == torch.float32
    y1 = linear(torch.empty(8, device="meta", dtype=torch.bfloat16),
                torch.empty(5, 8, device="meta", dtype=torch.bfloat16))
    assert y1.shape == (5,) and y1.dtype == torch.bfloat16
    y.backward(torch.empty_like(y))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    assert x.grad.device.type == "meta"


def _sample(lead, K, N, dtype, bias, gen, rg=True, x_layout="contig"):
    x = make_x(lead, K, x_layout, dtype, gen).requires_grad_(rg)
    w = randn((N, K), dtype, gen).requires_grad_(rg)
    b = randn((N,), dtype, gen).requires_grad_(rg) if bias else None
    return x, w, b


OPCHECK_LINEAR = [
    ((5,), 4, 3, torch.float32, True, True, "contig"),
    ((2, 3), 4, 6, torch.float32, False, True, "strided"),
    ((4,), 7, 2, torch.bfloat16, True, False, "contig"),
    ((0,), 4, 3, torch.float16, True, True, "contig"),
]


@pytest.mark.parametrize("lead,K,N,dtype,bias,rg,xl", OPCHECK_LINEAR,
                         ids=[f"case{i}" for i in range(len(OPCHECK_LINEAR))])
def test_opcheck_linear(lead, K, N, dtype, bias, rg, xl, gen):
    torch.library.opcheck(torch.ops.tltorch.linear.default, _sample(lead, K, N, dtype, bias, gen, rg, xl))


@pytest.mark.parametrize("flags", [(True, True, True), (True, False, True), (False, True, False),
                                   (True, False, False), (False, False, True)],
                         ids=lambda f: "".join("xwb"[i] for i in range(3) if f[i]))
def test_opcheck_linear_backward(flags, gen):
    x, w, _ = _sample((2, 3), 5, 4, torch.float32, False, gen, rg=False)
    g = torch.randn(2, 3, 4, generator=gen)
    torch.library.opcheck(torch.ops.tltorch.linear_backward.default, (g, x, w, *flags))


@pytest.mark.parametrize("flags", GRAD_FLAGS, ids=lambda f: "".join("xwb"[i] for i in range(3) if f[i]))
def test_custom_op_autograd(flags, gen):
    """The op torch.compile sees, differentiated directly: the same gradients as the eager path, and
    none for inputs that do not require them."""
    rx, rw, rb = flags
    x = torch.randn(6, 5, generator=gen, requires_grad=rx)
    w = torch.randn(4, 5, generator=gen, requires_grad=rw)
    b = torch.randn(4, generator=gen, requires_grad=rb)
    g = torch.randn(6, 4, generator=gen)
    y = torch.ops.tltorch.linear(x, w, b)
    y.backward(g)
    xd, wd, bd = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w, b))
    F.linear(xd, wd, bd).backward(g.double())
    assert_close(y, F.linear(xd, wd, bd), torch.float32)
    for t, td in ((x, xd), (w, wd), (b, bd)):
        if t.requires_grad:
            assert_close(t.grad, td.grad, torch.float32)
        else:
            assert t.grad is None


def test_torch_compile_fullgraph(gen):
    """One small compile. backend="aot_eager" runs what matters for tltorch (dynamo tracing with
    fullgraph, the fake kernels, AOT autograd's joint graph through linear_backward) without
    Inductor's code generation, which takes ~20 s cold and only wraps the opaque op."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, w, b):
        return torch.relu(linear(x, w, b)) * 2.0

    x = torch.randn(3, 7, 10, generator=gen, requires_grad=True)
    w = torch.randn(6, 10, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    g = torch.randn(3, 7, 6, generator=gen)
    y = f(x, w, b)
    y.backward(g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = torch.relu(F.linear(xd, wd, bd)) * 2.0
    yd.backward(g.double())
    assert_close(y, yd, torch.float32, what="compiled y")
    for t, td in ((x, xd), (w, wd), (b, bd)):
        assert_close(t.grad, td.grad, torch.float32, what="compiled grad")


# ---- bad arguments ------------------------------------------------------------------------------------

def _bad_cases():
    x = torch.randn(4, 6)
    w = torch.randn(3, 6)
    b = torch.randn(3)
    return [
        ("list x", ([[1.0] * 6] * 4, w, b), TypeError, "x"),
        ("None x", (None, w, b), TypeError, "x"),
        ("str weight", (x, "w", b), TypeError, "weight"),
        ("list bias", (x, w, [0.0] * 3), TypeError, "bias"),
        ("float64 x", (x.double(), w.double(), None), TypeError, "x"),
        ("int x", (x.long(), w, None), TypeError, "x"),
        ("float64 weight", (x, w.double(), None), TypeError, "weight"),
        ("x/weight dtypes", (x, w.bfloat16(), None), TypeError, "weight"),
        ("bias dtype", (x, w, b.half()), TypeError, "bias"),
        ("bias float64", (x, w, b.double()), TypeError, "bias"),
        ("feature size", (torch.randn(4, 5), w, b), ValueError, "x"),
        ("weight 1-D", (x, torch.randn(6), None), ValueError, "weight"),
        ("weight 3-D", (x, torch.randn(1, 3, 6), None), ValueError, "weight"),
        ("bias shape", (x, w, torch.randn(4)), ValueError, "bias"),
        ("bias 2-D", (x, w, torch.randn(1, 3)), ValueError, "bias"),
        ("x 0-D", (torch.tensor(1.0), torch.randn(3, 1), None), ValueError, "x"),
        ("complex x", (x.to(torch.complex64), w, None), TypeError, "x"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_linear_bad_arguments(case):
    _, args, exc, name = case
    with pytest.raises(exc, match=rf"\b{name}\b"):
        linear(*args)


def test_linear_device_mismatch_names_argument():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"\bweight\b"):
        linear(x, torch.empty(3, 6, device="meta"))
    with pytest.raises(ValueError, match=r"\bbias\b"):
        linear(x, torch.randn(3, 6), torch.empty(3, device="meta"))


# ---- backend_info -------------------------------------------------------------------------------------

def test_backend_info():
    info = tltorch.backend_info()
    assert set(info) == {"version", "cuda_built", "cuda_available", "device_name", "cpu_isa", "bf16_gemm",
                         "int8_isa", "bf16_linear", "num_threads"}
    assert info["bf16_gemm"] in ("avx512_bf16", info["cpu_isa"])
    assert info["int8_isa"] in ("amx", "avx512vnni", "portable")
    assert info["bf16_linear"] in ("onednn", "tltorch")
    assert info["version"] == tltorch.__version__ and isinstance(info["version"], str)
    assert isinstance(info["cuda_built"], bool)
    assert isinstance(info["cuda_available"], bool)
    assert info["cpu_isa"] in ("avx512", "avx2", "portable") and info["cpu_isa"] == _C.cpu_isa()
    assert isinstance(info["num_threads"], int) and info["num_threads"] == torch.get_num_threads()
    if info["cuda_available"]:
        assert info["cuda_built"] and isinstance(info["device_name"], str) and info["device_name"]
    else:
        assert info["device_name"] is None
    if not torch.cuda.is_available():
        assert info["cuda_available"] is False

