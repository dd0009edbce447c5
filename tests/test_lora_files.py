"""Adapter files and the habits of PEFT users: LoRALinear's frozen base, PEFT's orthogonal init."""
import copy
import json

import pytest
import torch
from torch import nn

from tltorch import LoraConfig, add_lora, load_adapter, save_adapter
from tltorch.nn import LoRALinear

TOL = dict(rtol=1e-5, atol=1e-5)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
PREFIX = "base_model.model."


class Stack(nn.Module):
    """layers.0 ... layers.10 (so "layers.1" is a prefix of "layers.10") and a classifier."""

    def __init__(self, n=11, d=6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.classifier = nn.Linear(d, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.classifier(x)


def make_stack(seed=0):
    torch.manual_seed(seed)
    return Stack().eval()


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
CFG = dict(r=2, lora_alpha=4, target_modules=["layers.1", "layers.2", "layers.10"], modules_to_save=["classifier"],
           bias="lora_only")


def randomize(model, seed=1, classifier=True):
    """Nonzero adapters and a changed classifier, so that a wrong scaling or weight shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n or (classifier and n.startswith("classifier.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def trained(base, seed=1, **kw):
    model = add_lora(copy.deepcopy(base), LoraConfig(**{**CFG, **kw}))
    randomize(model, seed)
    return model


def scalings(model):
    return {n: m.scaling for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def rewrite(folder, config=None, tensors=None):
    """Rewrite an adapter folder as another tool would (no tltorch digest in the weights' metadata),
    with config updates and tensors replaced ({key: tensor, or None to drop it})."""
    from safetensors.torch import load_file, save_file

    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(config or {})
    cfg_path.write_text(json.dumps(cfg))
    t = load_file(w_path)
    for k, v in (tensors or {}).items():
        if v is None:
            del t[k]
        else:
            t[k] = v
    save_file(t, w_path, metadata={"format": "pt"})


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sorted(k for k in model.__dict__ if not k.startswith("_") or k == "_tltorch_lora_config"))


def assert_unchanged(model, snap):
    state, types, grads, attrs = snapshot(model)
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k]) for k in state)
    assert types == snap[1]
    assert grads == snap[2]
    assert attrs == snap[3]


# ---- LoRALinear's base, orthogonal init ----------------------------------------------------------------

def test_hand_built_layer_freezes_base():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = LoRALinear(base, r=2)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    x = torch.randn(4, 8, requires_grad=True)
    layer(x).square().sum().backward()
    assert base.weight.grad is None and base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and x.grad is not None


def test_orthogonal_init():
    base = make_stack()
    model = add_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["layers.1", "layers.10"],
                                                     init_lora_weights="orthogonal"))
    torch.testing.assert_close(model(X), base(X), **TOL)  # lora_B @ lora_A = 0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            assert m.lora_A.abs().min() > 0 and m.lora_B.abs().min() > 0
            assert (m.lora_B @ m.lora_A).abs().max() < 1e-6
    with pytest.raises(ValueError, match="even"):
        LoraConfig(r=3, target_modules=["layers.1"], init_lora_weights="orthogonal")


# ---- with PEFT and transformers ------------------------------------------------------------------------

def _bert(cls, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                  vocab_size=50, **{"num_labels": 3, **kw})
    return getattr(transformers, cls)(cfg).eval()


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))


def outputs(model):
    with torch.no_grad():
        out = model(input_ids=IDS)
    return torch.cat([out.start_logits, out.end_logits], -1) if hasattr(out, "start_logits") else out.logits


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_orthogonal_adapters_move_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = _bert("BertForSequenceClassification")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                                  init_lora_weights="orthogonal"))
    torch.testing.assert_close(outputs(pm), outputs(base), **TOL)
    perturb(pm, seed=2)
    want = outputs(pm)
    pm.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(outputs(ours), want, **TOL)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "orthogonal"
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(outputs(back), want, **TOL)
