"""LoRA over a compact frozen body (QLoRA style): LoRALinear wrapping a tltorch.nn.FrozenLinear (bfloat16,
float16 or int8 weight). The layer against a float64 reference of the weight it stores; gradients; merge and
unmerge (exact restore of the stored weight); adapters moving between a compact body and PEFT on the float32
model. Tiny models from configs: no downloads."""
import contextlib
import copy

import pytest
import torch
from torch import nn

import tltorch
from tltorch import LoraConfig, add_lora, disable_lora, load_adapter, merge_lora, save_adapter
from tltorch.nn import FrozenLinear, LoRALinear

STORAGES = ("bfloat16", "float16", "int8")
# max|out - ref| / max|ref| of a layer whose activations the frozen kernel may round (bf16, int8 per token)
LAYER_TOL = {"bfloat16": 2e-2, "float16": 2e-3, "int8": 2e-2}


def compact_layer(storage, d_in=37, d_out=29, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(d_out, generator=g))
    layer = LoRALinear(FrozenLinear.from_linear(lin, storage), r=r, lora_alpha=8, init_lora_weights=False)
    return layer


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 37), (0, 37)], ids=["2d", "3d", "empty"])
def test_forward_and_grads_against_float64(storage, shape):
    layer = compact_layer(storage)
    assert layer.lora_A.dtype == torch.float32 and layer.compact
    w = layer.base.dequantized_weight(torch.float64)
    b = layer.base.bias.double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 29) and y.dtype == torch.float32
    x64 = x.detach().double().requires_grad_(True)
    a64 = layer.lora_A.detach().double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    ref = x64 @ w.T + b + layer.scaling * (x64 @ a64.T) @ b64.T
    if x.numel() == 0:
        assert y.numel() == 0
        return
    assert rel(y, ref) < LAYER_TOL[storage]
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(gy)
    ref.backward(gy.double())
    # dx goes through the stored weight (float32 arithmetic in the frozen kernel's backward), dA and dB
    # through the adapter's float32 GEMMs
    assert rel(x.grad, x64.grad) < 1e-5
    assert rel(layer.lora_A.grad, a64.grad) < 1e-5
    assert rel(layer.lora_B.grad, b64.grad) < 1e-5


@pytest.mark.parametrize("storage", STORAGES)
def test_under_bfloat16_autocast_the_adapter_computes_in_bfloat16(storage):
    """As PEFT's adapters over 8-bit layers under autocast: base and adapter in bfloat16, y bfloat16,
    gradients reaching the float32 adapter and x through the casts, close to float64 at bfloat16's
    precision."""
    layer = compact_layer(storage)
    w, b = layer.base.dequantized_weight(torch.float64), layer.base.bias.double()
    x = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B))
    ref = x64 @ w.T + b + layer.scaling * (x64 @ a64.T) @ b64.T
    assert rel(y, ref) < 3e-2
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.float().backward(gy)
    ref.backward(gy.double())
    for got, want in ((x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        assert got.dtype == torch.float32 and rel(got, want) < 3e-2
    # in float32 outside autocast: the adapter's float32 GEMMs (test_forward_and_grads_against_float64)
    assert rel(layer(x), ref) < LAYER_TOL[storage]


@pytest.mark.parametrize("storage", STORAGES)
def test_merge_unmerge_restores_the_stored_weight(storage):
    layer = compact_layer(storage)
    x = torch.randn(6, 37, generator=torch.Generator().manual_seed(4))
    stored = layer.base.weight.clone()
    scale = None if layer.base.weight_scale is None else layer.base.weight_scale.clone()
    with torch.no_grad():
        y = layer(x)
        if storage == "int8":
            with pytest.warns(UserWarning, match="requantises"):
                layer.merge()
        else:
            layer.merge()
        assert layer.merged and not torch.equal(layer.base.weight, stored)
        ym = layer(x)
        assert rel(ym, y) < 3 * LAYER_TOL[storage]
        layer.unmerge()
    assert torch.equal(layer.base.weight, stored)
    if scale is not None:
        assert torch.equal(layer.base.weight_scale, scale)
    with torch.no_grad():
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("storage", STORAGES)
def test_disable_returns_the_base(storage):
    layer = compact_layer(storage)
    x = torch.randn(6, 37, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        layer.disabled = True
        assert torch.equal(layer(x), layer.base(x))


def test_dropout_applies_to_the_adapter_only():
    lin = compact_layer("int8")
    layer = LoRALinear(lin.base, r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(64, 37, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base = layer.base(x)
        ev = layer.eval()(x) - base
        layer.train()
        torch.manual_seed(7)
        tr = layer(x) - base
        torch.manual_seed(7)
        tr2 = layer(x) - base
    assert torch.equal(tr, tr2)
    assert not torch.allclose(tr, ev)
    # dropout(x) scales kept inputs by 1/(1-p): on average the update is the eval one
    assert abs(tr.mean().item() - ev.mean().item()) < 0.5 * ev.abs().mean().item()



@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_dropout_gradients_use_the_forward_mask(autocast):
    """Training with dropout: x's and the adapter's gradients against float64 autograd through the same
    mask (drawn again from the seed the layer drew), in float32 and under bfloat16 autocast."""
    lin = compact_layer("int8")
    layer = LoRALinear(lin.base, r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False).train()
    x = torch.randn(64, 37, generator=torch.Generator().manual_seed(6), requires_grad=True)
    torch.manual_seed(7)
    with (torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()):
        y = layer(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    y.float().backward(gy)
    torch.manual_seed(7)
    mask = tltorch.ops.dropout(torch.ones(64, 37), 0.5, int(tltorch.ops.next_dropout_seed())).double()
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    w, b = layer.base.dequantized_weight(torch.float64), layer.base.bias.double()
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B))
    (x64 @ w.T + b + layer.scaling * ((x64 * mask) @ a64.T) @ b64.T).backward(gy.double())
    tol = 3e-2 if autocast else 1e-5
    for got, want in ((x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        assert got.dtype == torch.float32 and rel(got, want) < tol

def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=50, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("storage", ("bfloat16", "int8"))
def test_add_lora_on_a_compact_body_trains_only_the_adapter(storage):
    model = tltorch.freeze(bert(), except_="classifier", storage=storage)
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                               modules_to_save=["classifier"]))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 and all(m.compact and m.base.storage == storage for m in layers)
    stored = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".weight")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 2])
    model.train()
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(input_ids=IDS).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(m.lora_B.abs().sum() > 0 for m in layers)  # lora_B starts at zero and moved
    for n, b in model.named_buffers():
        if n in stored:
            assert torch.equal(b, stored[n]), n


@pytest.mark.parametrize("storage", (None, "int8"))
def test_freeze_after_add_lora_keeps_the_adapter_training(storage):
    """freeze on a model with adapters freezes (and compacts) the body, not the adapters: their A and B
    keep requires_grad and their dropout follows model.train(); the body's dropout stays off."""
    model = add_lora(bert().train(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                target_modules=["query", "value"], init_lora_weights=False))
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all(".lora_" in n for n in adapter)
    tltorch.freeze(model, storage=storage)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 and all(m.compact == (storage is not None) for m in layers)
    model.train()
    with torch.no_grad():
        a, b = model(input_ids=IDS).logits, model(input_ids=IDS).logits
    assert not torch.equal(a, b)  # the adapters' dropout draws anew
    assert all(m.training for m in layers)
    with torch.no_grad(), disable_lora(model):  # the body's dropout: off
        assert torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
    model.eval()
    assert torch.equal(logits(model), logits(model))
    loss = model(input_ids=IDS).logits.square().sum()
    loss.backward()
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for m in layers)


@pytest.mark.parametrize("storage", ("bfloat16", "int8"))
def test_adapter_moves_between_a_compact_body_and_peft(storage, tmp_path):
    peft = pytest.importorskip("peft")
    fp32 = bert()
    compact = tltorch.freeze(copy.deepcopy(fp32), storage=storage)
    add_lora(compact, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    save_adapter(compact, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(fp32), tmp_path / "a").eval()
    # PEFT's float32 model with the adapter trained on the compact body: the same function up to the
    # body's storage rounding
    assert rel(logits(theirs), logits(compact)) < 0.05
    # and back: PEFT's save loads onto a fresh compact body with the same adapter weights
    theirs.save_pretrained(tmp_path / "b")
    again = tltorch.freeze(copy.deepcopy(fp32), storage=storage)
    load_adapter(again, tmp_path / "b")
    assert torch.equal(logits(again), logits(compact))
    with disable_lora(again):
        plain = logits(again)
    assert not torch.allclose(plain, logits(again))


def test_merge_lora_on_a_compact_body():
    model = tltorch.freeze(bert(), storage="bfloat16")
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query"], init_lora_weights=False))
    before = logits(model)
    merged = merge_lora(model, unload=True)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert isinstance(merged.bert.encoder.layer[0].attention.self.query, FrozenLinear)
    assert rel(logits(merged), before) < 0.02


def test_set_weight_checks_the_shape():
    layer = FrozenLinear(4, 3, storage="int8")
    with pytest.raises(ValueError, match="weight must have shape"):
        layer.set_weight(torch.zeros(3, 5))
