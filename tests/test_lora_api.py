"""The user-facing LoRA API: LoraConfig, add_lora, LoRALinear, merge/unmerge, disable_lora, merge_lora,
save_adapter/load_adapter (round trip and bad files), trainable_parameters, torch.compile."""
import contextlib
import copy
import json
import math
import os

import pytest
import torch
from torch import nn

import tltorch
from tltorch import LoraConfig, add_lora, disable_lora, load_adapter, merge_lora, save_adapter
from tltorch.nn import LoRALinear


class Conv1D(nn.Module):
    """transformers' Conv1D (weight stored (in, out)), written out so these tests need no transformers;
    tltorch recognises it by class name, as it does the real one (tested in test_lora_peft.py)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d)
        self.xquery = nn.Linear(d, d)  # "query" is a suffix of its name, not of its dotted path
        self.proj = Conv1D(d, d)

    def forward(self, x):
        return self.proj(torch.tanh(self.query(x)) * self.key(x) + self.value(x) + 0.5 * self.xquery(x))


class Net(nn.Module):
    """Two blocks, a LayerNorm, a classifier and an output head (get_output_embeddings, like transformers)."""

    def __init__(self, d=12, classes=5):
        super().__init__()
        self.embed = nn.Linear(7, d)
        self.blocks = nn.ModuleList([Attn(d) for _ in range(2)])
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, classes)
        self.lm_head = nn.Linear(d, 9, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b(h)
        h = self.norm(h)
        return torch.cat([self.classifier(h), self.lm_head(h)], -1)


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # LayerNorm starts at (1, 0): make its parameters ordinary random ones
        net.norm.weight.add_(torch.randn(12) * 0.1)
        net.norm.bias.add_(torch.randn(12) * 0.1)
    return net.eval()


def randomize_lora(model, seed=1):
    """Nonzero lora_B (and fresh lora_A) in every adapter, so an adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


def lora_paths(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


X = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(123))
TOL = dict(rtol=1e-5, atol=1e-5)


# ---- LoRALinear --------------------------------------------------------------------------------------

def reference(x, w, b, A, B, s):
    x, w, A, B = (t.double() for t in (x, w, A, B))
    y = x @ w.T + s * (x @ A.T @ B.T)
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("xshape", [(13,), (5, 13), (2, 3, 13)], ids=["1d", "2d", "3d"])
def test_lora_linear_matches_formula(conv1d, rslora, xshape):
    torch.manual_seed(len(xshape) + 10 * conv1d + 100 * rslora)
    base = Conv1D(11, 13) if conv1d else nn.Linear(13, 11)
    layer = LoRALinear(base, r=4, lora_alpha=6, use_rslora=rslora)
    randomize_lora(layer)
    assert layer.scaling == pytest.approx(6 / (2.0 if rslora else 4.0))
    assert (layer.in_features, layer.out_features) == (13, 11)
    assert layer.lora_A.shape == (4, 13) and layer.lora_B.shape == (11, 4)
    assert layer.weight is base.weight and layer.bias is base.bias and layer.base is base
    w = base.weight.t() if conv1d else base.weight
    x = torch.randn(xshape, requires_grad=True)
    y = layer(x)
    ref = reference(x, w, base.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(y.double(), ref, **TOL)
    g = torch.randn(y.shape)
    y.backward(g)
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B))
    reference(xr, w.detach(), base.bias.detach(), Ar, Br, layer.scaling).backward(g.double())
    for got, want in ((x.grad, xr.grad), (layer.lora_A.grad, Ar.grad), (layer.lora_B.grad, Br.grad)):
        torch.testing.assert_close(got.double(), want, **TOL)


def test_lora_linear_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4, lora_dropout=0.5)
    randomize_lora(layer)
    x = torch.randn(32, 16)
    full = layer.eval()(x)
    ref = reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(full.double(), ref, **TOL)
    layer.train()
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    b = layer(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the mask comes from torch's generator
    assert not torch.allclose(a, full, atol=1e-3)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_identity_at_init(init):
    net = make_net()
    before = net(X)
    add_lora(net, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=init))
    torch.testing.assert_close(net(X), before, **TOL)
    for m in net.modules():
        if isinstance(m, LoRALinear):
            assert torch.count_nonzero(m.lora_B) == 0
            A = m.lora_A.detach()
            if init is True:  # Kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
                bound = 1 / math.sqrt(m.in_features)
                assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
            else:
                assert 0.6 / 8 < A.std().item() < 1.4 / 8  # N(0, std 1/r)
    # init_lora_weights=False starts away from the identity: the comparison above can fail
    net2 = add_lora(make_net(), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    assert not torch.allclose(net2(X), before, atol=1e-3)


def test_extra_repr():
    layer = LoRALinear(nn.Linear(6, 5), r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True)
    text = repr(layer)
    for part in ("in_features=6", "out_features=5", "r=2", "lora_alpha=4", "use_rslora=True",
                 "lora_dropout=0.1", "Linear(in_features=6"):
        assert part in text, text
    layer.merge()
    assert "merged=True" in repr(layer)


# ---- choosing layers ---------------------------------------------------------------------------------

def test_target_list_matches_path_suffixes():
    net = add_lora(make_net(), LoraConfig(target_modules=["query", "blocks.1.value"]))
    assert lora_paths(net) == ["blocks.0.query", "blocks.1.query", "blocks.1.value"]
    assert isinstance(net.blocks[0].xquery, nn.Linear)  # 'xquery' does not end in '.query'


def test_target_regex_is_a_full_match():
    net = add_lora(make_net(), LoraConfig(target_modules=r"blocks\.\d\.(key|proj)"))
    assert lora_paths(net) == ["blocks.0.key", "blocks.0.proj", "blocks.1.key", "blocks.1.proj"]
    assert net.blocks[0].proj.is_conv1d and not net.blocks[0].key.is_conv1d
    with pytest.raises(ValueError, match="matches no Linear"):  # 'key' as a regex must match a whole path
        add_lora(make_net(), LoraConfig(target_modules="key"))


def test_all_linear_excludes_output_head_and_modules_to_save():
    net = add_lora(make_net(), LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    want = ["embed"] + [f"blocks.{i}.{n}" for i in range(2) for n in ("key", "proj", "query", "value", "xquery")]
    assert lora_paths(net) == sorted(want)
    assert type(net.lm_head) is nn.Linear and type(net.classifier) is nn.Linear


def test_target_errors():
    with pytest.raises(ValueError, match="matches no Linear"):
        add_lora(make_net(), LoraConfig(target_modules=["nothing_like_this"]))
    with pytest.raises(ValueError, match="LayerNorm"):
        add_lora(make_net(), LoraConfig(target_modules=["norm"]))
    with pytest.raises(ValueError, match="no default"):
        add_lora(make_net(), LoraConfig())
    with pytest.raises(ValueError, match="modules_to_save"):
        add_lora(make_net(), LoraConfig(target_modules=["query"], modules_to_save=["clasifier"]))
    net = add_lora(make_net(), LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(net, LoraConfig(target_modules=["value"]))
    with pytest.raises(TypeError, match="LoraConfig"):
        add_lora(make_net(), {"target_modules": ["query"]})


@pytest.mark.parametrize("kwargs, exc", [
    (dict(r=0), ValueError), (dict(r=-2), ValueError), (dict(r=2.5), TypeError), (dict(r=True), TypeError),
    (dict(lora_dropout=1.0), ValueError), (dict(lora_dropout=-0.1), ValueError),
    (dict(lora_dropout="0.1"), TypeError), (dict(lora_alpha=float("nan")), ValueError),
    (dict(bias="some"), ValueError), (dict(bias=None), ValueError),
    (dict(target_modules=5), TypeError), (dict(target_modules=["q", 3]), TypeError),
    (dict(target_modules=[]), ValueError), (dict(target_modules="(unclosed"), ValueError),
    (dict(modules_to_save=[1]), TypeError), (dict(init_lora_weights="pissa"), ValueError),
    (dict(init_lora_weights=1), ValueError), (dict(use_rslora="yes"), TypeError),
])
def test_bad_config(kwargs, exc):
    with pytest.raises(exc):
        LoraConfig(**{"target_modules": ["query"], **kwargs})


def test_bad_lora_linear():
    with pytest.raises(TypeError, match="Linear"):
        LoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear(nn.Linear(3, 3), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(nn.Linear(3, 3), lora_dropout=1.5)
    with pytest.raises(TypeError, match="already"):
        LoRALinear(LoRALinear(nn.Linear(3, 3)))


# ---- training ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapter_parameters_train(bias):
    net = make_net().train()
    add_lora(net, LoraConfig(r=4, target_modules=["query", "proj"], modules_to_save=["classifier"], bias=bias))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    expected = {n for n in before if ".lora_" in n or n.startswith("classifier.")}
    if bias == "all":
        expected |= {n for n in before if n.endswith("bias")}
    elif bias == "lora_only":
        expected |= {f"blocks.{i}.{m}.base.bias" for i in range(2) for m in ("query", "proj")}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)  # the user's optimizer, given every parameter
    target = torch.randn(3, 4, 14)
    for _ in range(3):
        opt.zero_grad()
        ((net(X) - target) ** 2).mean().backward()
        opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected


def test_trainable_parameters(capsys):
    net = add_lora(make_net(), LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    total = sum(p.numel() for p in net.parameters())
    want = 2 * 2 * (12 + 12) + 12 * 5 + 5
    assert tltorch.trainable_parameters(net) == (want, total)
    assert capsys.readouterr().out == ""
    tltorch.trainable_parameters(net, print_summary=True)
    out = capsys.readouterr().out
    assert out == f"trainable params: {want:,} || all params: {total:,} || trainable%: {100 * want / total:.4f}\n"


# ---- merging, disabling ------------------------------------------------------------------------------

def test_merge_unmerge_round_trip():
    net = add_lora(make_net(), LoraConfig(r=4, lora_alpha=12, target_modules=["query", "proj"]))
    randomize_lora(net)
    y = net(X)
    layers = [m for m in net.modules() if isinstance(m, LoRALinear)]
    weights = [m.weight.detach().clone() for m in layers]
    for m, w in zip(layers, weights):
        m.merge()
        m.merge()  # a second merge is a no-op
        assert m.merged
        delta = (m.lora_B @ m.lora_A * m.scaling).detach()
        torch.testing.assert_close(m.weight.detach(), w + (delta.t() if m.is_conv1d else delta))
    torch.testing.assert_close(net(X), y, **TOL)
    for m, w in zip(layers, weights):
        m.unmerge()
        assert not m.merged
        torch.testing.assert_close(m.weight.detach(), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(net(X), y, **TOL)


def test_merge_lora_unload_gives_plain_torch_model():
    base = make_net()
    net = add_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    randomize_lora(net)
    y = net(X)
    out = merge_lora(net, unload=True)
    assert out is net
    assert not [m for m in out.modules() if type(m).__module__.startswith("tltorch")]
    assert out.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(out(X), y, **TOL)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(out)


def test_merge_lora_in_place():
    net = add_lora(make_net(), LoraConfig(r=4, target_modules=["value"]))
    randomize_lora(net)
    y = net(X)
    merge_lora(net)
    assert all(m.merged for m in net.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(net(X), y, **TOL)


def test_disable_lora_gives_base_outputs():
    base = make_net()
    y_base = base(X)
    net = add_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(net)
    y = net(X)
    assert not torch.allclose(y, y_base, atol=1e-3)
    with disable_lora(net):
        torch.testing.assert_close(net(X), y_base, **TOL)
    torch.testing.assert_close(net(X), y, **TOL)
    with pytest.raises(RuntimeError, match="boom"), disable_lora(net):
        raise RuntimeError("boom")
    torch.testing.assert_close(net(X), y, **TOL)
    merge_lora(net)  # merged layers are taken out while disabled, and merged again afterwards
    with disable_lora(net):
        torch.testing.assert_close(net(X), y_base, **TOL)
    assert all(m.merged and not m.disabled for m in net.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(net(X), y, **TOL)


# ---- saving and loading ------------------------------------------------------------------------------

CFG = dict(r=4, lora_alpha=16, target_modules=["query", "proj"], modules_to_save=["classifier"], bias="lora_only")


def trained(base, **kw):
    net = add_lora(copy.deepcopy(base), LoraConfig(**{**CFG, **kw}))
    randomize_lora(net)
    with torch.no_grad():
        net.classifier.weight.add_(1.0)
        net.blocks[1].query.base.bias.add_(1.0)
    return net


def test_save_load_round_trip(tmp_path):
    from safetensors.torch import load_file

    base = make_net()
    net = trained(base)
    save_adapter(net, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", 4, 16, "lora_only")
    assert cfg["target_modules"] == ["query", "proj"] and cfg["modules_to_save"] == ["classifier"]
    assert cfg["fan_in_fan_out"] is True  # a Conv1D is adapted
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    want = {f"base_model.model.blocks.{i}.{m}.{k}" for i in range(2) for m in ("query", "proj")
            for k in ("lora_A.weight", "lora_B.weight", "base_layer.bias")}
    assert keys == want | {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}

    fresh = load_adapter(copy.deepcopy(base), tmp_path)  # adds the adapters from the file's config
    assert lora_paths(fresh) == lora_paths(net)
    torch.testing.assert_close(fresh(X), net(X), rtol=0, atol=0)
    grads = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert grads(fresh) == grads(net)

    other = add_lora(copy.deepcopy(base), LoraConfig(**CFG))  # a model with adapters: weights only
    assert not torch.allclose(other(X), net(X), atol=1e-3)
    load_adapter(other, tmp_path)
    torch.testing.assert_close(other(X), net(X), rtol=0, atol=0)


def test_adapters_start_in_the_mode_of_the_layers_they_wrap(tmp_path):
    """add_lora / load_adapter on a model in eval mode: no dropout until model.train() (PeftModel's
    from_pretrained returns its model in eval mode too); on a model in train mode: dropout on."""
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["query", "proj"], init_lora_weights=False)
    save_adapter(add_lora(make_net(), cfg), tmp_path)
    for make in (lambda m: add_lora(m, cfg), lambda m: load_adapter(m, tmp_path)):
        net = make(make_net().eval())
        layers = [m for m in net.modules() if isinstance(m, LoRALinear)]
        assert layers and not any(m.training for m in layers)
        torch.testing.assert_close(net(X), net(X), rtol=0, atol=0)
        net.train()
        assert not torch.equal(net(X), net(X))
        net = make(make_net().train())
        assert all(m.training for m in net.modules() if isinstance(m, LoRALinear))


def test_save_all_linear_and_alpha_from_file(tmp_path):
    base = make_net()
    net = add_lora(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules="all-linear"))
    randomize_lora(net)
    save_adapter(net, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == lora_paths(net) and cfg["use_rslora"] is True
    other = add_lora(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=1, target_modules="all-linear"))
    load_adapter(other, tmp_path)  # the adapter's scaling comes with it
    torch.testing.assert_close(other(X), net(X), rtol=0, atol=0)


def test_save_writes_atomically(tmp_path, monkeypatch):
    import safetensors.torch

    net = trained(make_net())
    save_adapter(net, tmp_path)
    old = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_lora(net, seed=7)

    def failing(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(net, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


@contextlib.contextmanager
def edited(folder, config=None, drop=None, add=None, reshape=None):
    """Rewrite an adapter folder's files with one defect."""
    from safetensors.torch import load_file, save_file

    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    tensors = load_file(w_path)
    if config:
        cfg.update(config)
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(3)
    if reshape:
        tensors[reshape] = torch.zeros(tensors[reshape].shape[0] + 1, *tensors[reshape].shape[1:])
    cfg_path.write_text(json.dumps(cfg))
    save_file(tensors, w_path)
    yield


@pytest.mark.parametrize("defect, exc, message", [
    (dict(config={"peft_type": "PREFIX_TUNING"}), ValueError, "peft_type"),
    (dict(config={"use_dora": True}), ValueError, "use_dora"),
    (dict(config={"r": 0}), ValueError, "r must be"),
    (dict(config={"init_lora_weights": "pissa"}), ValueError, "pissa"),
    (dict(drop="base_model.model.blocks.0.query.lora_B.weight"), ValueError, "lacks"),
    (dict(drop="base_model.model.classifier.weight"), ValueError, "lacks"),
    (dict(add="base_model.model.blocks.0.key.lora_X"), ValueError, "match nothing"),
    (dict(reshape="base_model.model.blocks.1.proj.lora_B.weight"), ValueError, "shape"),
    (dict(reshape="base_model.model.classifier.weight"), ValueError, "shape"),
])
@pytest.mark.parametrize("into", ["fresh", "adapted"])
def test_load_bad_files(tmp_path, defect, exc, message, into):
    base = make_net()
    save_adapter(trained(base), tmp_path)
    model = copy.deepcopy(base) if into == "fresh" else add_lora(copy.deepcopy(base), LoraConfig(**CFG))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with edited(tmp_path, **defect), pytest.raises(exc, match=message):
        load_adapter(model, tmp_path)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert lora_paths(model) == ([] if into == "fresh" else lora_paths(trained(base)))


def test_load_missing_and_unreadable_files(tmp_path):
    base = make_net()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(base, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(base, tmp_path)
    save_adapter(trained(base), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_adapter(base, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="safetensors"):
        load_adapter(base, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_adapter(base, tmp_path)


def test_load_mismatched_model(tmp_path):
    base = make_net()
    save_adapter(trained(base), tmp_path)
    with pytest.raises(ValueError, match="shape"):  # rank 8 adapters, a rank 4 file
        load_adapter(add_lora(copy.deepcopy(base), LoraConfig(**{**CFG, "r": 8})), tmp_path)
    with pytest.raises(ValueError, match="lacks"):  # the model has adapters the file does not
        load_adapter(add_lora(copy.deepcopy(base), LoraConfig(**{**CFG, "target_modules": "all-linear"})), tmp_path)
    merged = add_lora(copy.deepcopy(base), LoraConfig(**CFG))
    merge_lora(merged)
    with pytest.raises(ValueError, match="merged"):
        load_adapter(merged, tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(base, tmp_path / "x")


# ---- torch.compile -----------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_torch_compile_no_graph_breaks():
    torch.manual_seed(0)
    torch._dynamo.reset()
    net = add_lora(MLP(), LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    randomize_lora(net)
    x = torch.randn(5, 10)
    explain = torch._dynamo.explain(net)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    assert str(explain.graphs[0].code).count("torch.ops.tltorch.lora_linear(") == 2

    eager = net(x)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    net.zero_grad()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=False)
    y = compiled(x)
    torch.testing.assert_close(y, eager, **TOL)
    y.square().sum().backward()
    for got, want in zip([p.grad for p in net.parameters() if p.requires_grad], grads):
        torch.testing.assert_close(got, want, **TOL)
    # the API sees through torch.compile's wrapper
    assert tltorch.trainable_parameters(compiled) == tltorch.trainable_parameters(net)
