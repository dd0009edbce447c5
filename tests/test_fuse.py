"""FrozenLinear + the activation after it as one oneDNN call (tltorch/_fuse.py, FrozenLinear.forward_act,
ops.frozen.bf16_linear_act), and extract_features' use of it.

Reference: act(x W^T + b) in float64 from x, W and b as the layer computes with them (x and the bias
rounded to bfloat16, W dequantised); tolerance for a bfloat16 output: 2^-7 of the output's largest
magnitude (one rounding of each output, plus the float32 sums). Where the CPU has no AVX512-BF16 (or
TLTORCH_CPU_ISA is avx2/portable) nothing is fused: forward_act returns None and extract_features' results
are exactly the unfused ones.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tltorch
import tltorch._fuse as fuse
import tltorch.extract as extract_mod
from tltorch import ops
from tltorch._fuse import _source_pairs, fused_activations
from tltorch.nn import FrozenLinear

NATIVE = ops.frozen.bf16_native()
ACTS = [("gelu", "none"), ("gelu", "tanh"), ("relu", "none")]


def _act64(z, act, approximate):
    return F.gelu(z, approximate=approximate) if act == "gelu" else F.relu(z)


def _frozen(k, n, storage, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return FrozenLinear.from_linear(lin, storage)


def _reference(layer, x, act, approximate):
    w = layer.dequantized_weight(torch.float64)
    z = x.to(torch.bfloat16).double() @ w.t()
    if layer.bias is not None:
        z = z + layer.bias.to(torch.bfloat16).double()
    return _act64(z, act, approximate)


def _close(y, ref):
    assert y.dtype is torch.bfloat16 and y.shape == ref.shape
    if ref.numel():
        err = (y.double() - ref).abs().max().item()
        assert err <= 2 ** -7 * max(ref.abs().max().item(), 1e-6), err


@pytest.mark.parametrize("act,approximate", ACTS)
@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
@pytest.mark.parametrize("shape", [(37, 65, 129), (1, 3, 5), (0, 16, 8), (2, 5, 33, 70)])
def test_forward_act_reference(act, approximate, storage, shape):
    *lead, k, n = shape
    layer = _frozen(k, n, storage)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.inference_mode():
        y = layer.forward_act(x, act, approximate)
    if not NATIVE:
        assert y is None
        return
    _close(y, _reference(layer, x, act, approximate))


@pytest.mark.skipif(not NATIVE, reason="oneDNN's bfloat16 linear needs AVX512-BF16")
def test_forward_act_views_and_autocast():
    layer = _frozen(48, 40, "bfloat16", bias=False)
    base = torch.randn(30, 96, generator=torch.Generator().manual_seed(2))
    for x in (base[:, ::2], base[:, :48].t().contiguous().t(), base.t()[:48].t()):  # strided, transposed
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # float32 x cast first
            y = layer.forward_act(x, "gelu")
        _close(y, _reference(layer, x, "gelu", "none"))


def test_forward_act_declines_gradients_and_float32():
    layer = _frozen(16, 8, "bfloat16")
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    assert layer.forward_act(x, "gelu") is None  # autograd wants the pre-activation
    assert layer.forward_act(torch.randn(4, 16), "gelu") is None  # float32 x: forward's own path
    assert _frozen(16, 8, "float16").forward_act(x.detach(), "gelu") is None
    with pytest.raises(ValueError, match="act"):
        ops.frozen.bf16_linear_act(x.detach(), layer.weight, None, "silu")
    with pytest.raises(TypeError, match="x"):
        layer.forward_act("x", "gelu")


# ---- which pairs are fused ----------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.dense, self.act = nn.Linear(12, 20), act

    def forward(self, h):
        h = self.dense(h)
        h = self.act(h)
        return h


class _Reuses(nn.Module):
    """The linear's output is read twice: fusing the activation into it would change the sum."""

    def __init__(self):
        super().__init__()
        self.dense, self.act = nn.Linear(12, 12), nn.GELU()

    def forward(self, h):
        y = self.dense(h)
        return self.act(y) + y


class _Elsewhere(nn.Module):
    """Pattern present, but self.act is also used on something else."""

    def __init__(self):
        super().__init__()
        self.dense, self.act = nn.Linear(12, 12), nn.GELU()

    def forward(self, h):
        h = self.dense(h)
        h = self.act(h)
        return h + self.act(h)


def _swapped(model):
    with fused_activations(model) as n:
        kinds = [type(m).__name__ for m in model.modules()]
    return n, kinds


def test_pairs_from_source():
    assert _source_pairs(_Block) == (("dense", "act"),)
    assert _source_pairs(_Reuses) == ()
    assert _source_pairs(_Elsewhere) == ()
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=40))
    assert _source_pairs(type(bert.encoder.layer[0].intermediate)) == (("dense", "intermediate_act_fn"),)


@pytest.mark.parametrize("act,fused", [(nn.GELU(), 1), (nn.GELU(approximate="tanh"), 1), (nn.ReLU(), 1),
                                       (nn.SiLU(), 0), (nn.Tanh(), 0)])
def test_which_activations(act, fused):
    model = tltorch.freeze(nn.Sequential(_Block(act)), storage="bfloat16")
    n, kinds = _swapped(model)
    assert n == fused and ("_LinearAct" in kinds) == bool(fused)


def test_not_fused():
    for model in (nn.Sequential(_Reuses()), nn.Sequential(_Elsewhere())):
        assert _swapped(tltorch.freeze(model, storage="bfloat16"))[0] == 0
    assert _swapped(nn.Sequential(_Block(nn.GELU())))[0] == 0  # an nn.Linear, not frozen compact
    hooked = tltorch.freeze(nn.Sequential(_Block(nn.GELU())), storage="bfloat16")
    seen = []
    hooked[0].dense.register_forward_hook(lambda m, i, o: seen.append(o))
    assert _swapped(hooked)[0] == 0
    act_hooked = tltorch.freeze(nn.Sequential(_Block(nn.GELU())), storage="bfloat16")
    act_hooked[0].act.register_forward_pre_hook(lambda m, i: None)
    assert _swapped(act_hooked)[0] == 0


def test_sequential_pairs():
    model = tltorch.freeze(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.ReLU(), nn.Tanh()),
                           storage="bfloat16")
    n, kinds = _swapped(model)
    assert n == 2 and kinds.count("_LinearAct") == 2 and kinds.count("Tanh") == 1


def test_restored_after_exit_and_error():
    model = tltorch.freeze(nn.Sequential(_Block(nn.GELU()), nn.Linear(20, 3), nn.ReLU()), storage="int8")
    before = list(model.named_modules())
    with fused_activations(model) as n:
        assert n == 2
    assert list(model.named_modules()) == before
    with pytest.raises(RuntimeError, match="boom"):
        with fused_activations(model):
            raise RuntimeError("boom")
    assert list(model.named_modules()) == before


# ---- extract_features ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, vocab_size=120)
    return transformers.BertModel(cfg).eval()


def _data():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 120, (9, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[4:, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def always_fuse(monkeypatch):
    """Fuse from the first call at any size (the default waits for a shape to recur; see below)."""
    monkeypatch.setattr(fuse, "FUSE_AFTER", 0)
    monkeypatch.setattr(fuse, "FUSE_MIN_OUTPUTS", 0)


def _spy(monkeypatch):
    calls = []
    real = ops.frozen.bf16_linear_act
    monkeypatch.setattr(ops.frozen, "bf16_linear_act", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    return calls


def test_fuses_recurring_shapes_only(monkeypatch):
    """oneDNN compiles a primitive per new shape (12-60 ms with the GELU post-op): a shape is fused from
    its FUSE_AFTER-th repeat on, and only at FUSE_MIN_OUTPUTS outputs a call."""
    monkeypatch.setattr(fuse, "FUSE_MIN_OUTPUTS", 20 * 40)
    calls = _spy(monkeypatch)
    model = tltorch.freeze(nn.Sequential(_Block(nn.GELU())), storage="bfloat16")
    xs = {m: torch.randn(m, 12, dtype=torch.bfloat16) for m in (40, 41, 39)}
    with torch.inference_mode(), fused_activations(model):
        outs = [model(xs[m]) for m in (40, 41, 40, 39, 40, 40, 40)]
    with torch.inference_mode():
        plain = [model(xs[m]) for m in (40, 41, 40, 39, 40, 40, 40)]
    assert calls == ([40, 40] if NATIVE else [])  # the 4th and 5th calls with 40 rows; 39 is too few outputs
    for y, p in zip(outs, plain):
        assert y.shape == p.shape and (y.double() - p.double()).abs().max() <= 2 ** -6 * p.abs().max()
    with torch.inference_mode(), fused_activations(model):  # counted across blocks, per layer
        model(xs[40])
    assert calls == ([40, 40, 40] if NATIVE else [])


def test_reads_source_only_where_a_pair_can_be(bert, monkeypatch):
    read = []
    real = fuse.inspect.getsource
    monkeypatch.setattr(fuse.inspect, "getsource", lambda c: read.append(c.__name__) or real(c))
    fuse._source_pairs.cache_clear()
    body = tltorch.freeze(copy.deepcopy(bert), storage="bfloat16")
    with fused_activations(body) as n:
        assert n == 2
    assert read == ["BertIntermediate"]  # not BertModel and its PreTrainedModel (a 6,000-line file)


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_extract_fused_against_unfused(bert, storage, monkeypatch, always_fuse):
    body = tltorch.freeze(copy.deepcopy(bert), storage=storage)
    before = [(n, type(m)) for n, m in body.named_modules()]
    calls = _spy(monkeypatch)
    fused = tltorch.extract_features(body, _data(), pooling="mean", compute_dtype=torch.bfloat16,
                                     progress=False)
    assert [(n, type(m)) for n, m in body.named_modules()] == before
    monkeypatch.setattr(extract_mod, "fused_activations", lambda b: contextlib.nullcontext(0))
    plain = tltorch.extract_features(body, _data(), pooling="mean", compute_dtype=torch.bfloat16,
                                     progress=False)
    ref = tltorch.extract_features(bert, _data(), pooling="mean", progress=False)
    if not NATIVE:
        assert not calls and torch.equal(fused, plain)
        return
    assert len(calls) == 2  # one per layer's feed-forward block, one batch
    cos = F.cosine_similarity
    # the activation of unrounded sums: at least as close to float32's features as autocast's path
    assert cos(fused, ref).min() >= 0.999
    assert (fused - plain).abs().max() <= 0.05 * plain.abs().max()


def test_extract_float32_unchanged(bert, monkeypatch):
    """Without compute_dtype nothing runs in bfloat16: fusing changes no bit."""
    body = tltorch.freeze(copy.deepcopy(bert), storage="bfloat16")
    a = tltorch.extract_features(body, _data(), pooling="cls", progress=False)
    monkeypatch.setattr(extract_mod, "fused_activations", lambda b: contextlib.nullcontext(0))
    b = tltorch.extract_features(body, _data(), pooling="cls", progress=False)
    assert torch.equal(a, b)
