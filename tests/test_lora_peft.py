"""tltorch's LoRA against PEFT: the same layer math, and adapter files that move both ways (BERT with
a trained classifier, GPT-2 with its Conv1D projections). Tiny models built from configs: no downloads."""
import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import tltorch  # noqa: E402
from tltorch import LoraConfig, add_lora, load_adapter, save_adapter  # noqa: E402
from tltorch.nn import LoRALinear  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")]


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=50, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
CASES = {
    "bert": (bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "gpt2": (gpt2, dict(target_modules=["c_attn"], fan_in_fan_out=True)),
}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def perturb(model, names, seed):
    """Give every parameter whose name contains one of `names` fresh random values (nonzero lora_B:
    the adapter then changes the logits, so the comparisons below can fail)."""
    g = torch.Generator().manual_seed(seed)
    hit = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                hit += 1
    assert hit


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize("case", CASES)
def test_tltorch_adapter_loads_in_peft(tmp_path, case, bias):
    make, kw = CASES[case]
    base = make()
    model = add_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, bias=bias, **kw))
    trained = {"none": [], "all": ["bias"], "lora_only": ["base.bias"]}[bias]
    perturb(model, ["lora_", "classifier."] + trained, seed=1)
    want = logits(model)
    assert not torch.allclose(want, logits(base), atol=1e-3)
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(pm), want, **TOL)
    cfg = pm.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.bias) == (4, 8, bias)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_tltorch(tmp_path, case, rslora):
    make, kw = CASES[case]
    base = make()
    bias = "lora_only" if case == "bert" else "none"
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=6, use_rslora=rslora, bias=bias,
                                                                   **kw))
    perturb(pm, ["lora_", "modules_to_save.default", "base_layer.bias" if bias != "none" else "lora_"], seed=2)
    pm.eval()
    want = logits(pm)
    assert not torch.allclose(want, logits(base), atol=1e-3)
    pm.save_pretrained(tmp_path)

    model = load_adapter(copy.deepcopy(base), tmp_path)  # adds the adapters the file describes
    torch.testing.assert_close(logits(model), want, **TOL)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    target = kw["target_modules"]
    assert layers and all(n.rsplit(".", 1)[1] in target for n in layers)
    assert all(m.is_conv1d == (case == "gpt2") for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want_trainable = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    if case == "bert":
        want_trainable |= {"classifier.weight", "classifier.bias"} | {f"{n}.base.bias" for n in layers}
    assert trainable == want_trainable

    # into a model that already has its adapters, too
    again = add_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=6, use_rslora=rslora, bias=bias, **kw))
    load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again), want, **TOL)


def test_round_trip_through_both(tmp_path):
    """tltorch -> PEFT -> tltorch keeps every saved tensor exactly."""
    from safetensors.torch import load_file

    base = gpt2()
    model = add_lora(copy.deepcopy(base), LoraConfig(r=2, target_modules=["c_attn", "c_fc"], lora_alpha=5))
    perturb(model, ["lora_"], seed=4)
    save_adapter(model, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    pm.save_pretrained(tmp_path / "b")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = load_adapter(copy.deepcopy(base), tmp_path / "b")
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is True


def test_per_layer_ranks_move_both_ways(tmp_path):
    """Hand-built adapters of different ranks and alphas travel as PEFT's rank_pattern/alpha_pattern."""
    base = gpt2()
    model = copy.deepcopy(base)
    for i, blk in enumerate(model.transformer.h):
        blk.attn.c_attn = LoRALinear(blk.attn.c_attn, r=2 + i, lora_alpha=3 + 2 * i)
        blk.mlp.c_fc = LoRALinear(blk.mlp.c_fc, r=5, lora_alpha=4)
    perturb(model, ["lora_"], seed=5)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    want = logits(model)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(pm), want, **TOL)
    pm.save_pretrained(tmp_path / "peft")
    back = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(back), want, **TOL)
    assert [m.r for m in back.modules() if isinstance(m, LoRALinear)] == [2, 5, 3, 5]


def test_all_linear_targets_what_peft_targets():
    for make in (bert, gpt2):
        base = make()
        model = add_lora(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear"))
        ours = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
        theirs = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
        assert ours == theirs and ours
        if make is gpt2:
            assert "lm_head" not in ours


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_layer_matches_peft_layer(conv1d, rslora):
    """LoRALinear and PEFT's lora.Linear with the same weights: same outputs and gradients."""
    torch.manual_seed(7)
    base = transformers.pytorch_utils.Conv1D(11, 13) if conv1d else nn.Linear(13, 11)
    if conv1d:
        nn.init.normal_(base.bias)
    ours = LoRALinear(copy.deepcopy(base), r=3, lora_alpha=5, use_rslora=rslora)
    holder = nn.Module()
    holder.layer = copy.deepcopy(base)
    pm = peft.get_peft_model(holder, peft.LoraConfig(r=3, lora_alpha=5, use_rslora=rslora, target_modules=["layer"],
                                                     fan_in_fan_out=conv1d, bias="lora_only"))
    theirs = pm.base_model.model.layer
    with torch.no_grad():
        ours.lora_A.normal_()
        ours.lora_B.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    ours.base.bias.requires_grad_(True)  # bias="lora_only", as PEFT's layer above has it
    x = torch.randn(2, 5, 13)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    g = torch.randn(y1.shape)
    y1.backward(g)
    y2.backward(g)
    pairs = [(x1.grad, x2.grad), (ours.lora_A.grad, theirs.lora_A["default"].weight.grad),
             (ours.lora_B.grad, theirs.lora_B["default"].weight.grad),
             (ours.base.bias.grad, theirs.base_layer.bias.grad)]
    for a, b in pairs:
        torch.testing.assert_close(a, b, **TOL)
    assert ours.base.weight.grad is None  # a frozen base gets no gradient


def test_trainable_summary_matches_peft(capsys):
    base = bert()
    model = add_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query", "value"]))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    assert tltorch.trainable_parameters(model) == pm.get_nb_trainable_parameters()
    tltorch.trainable_parameters(model, print_summary=True)
    ours = capsys.readouterr().out
    pm.print_trainable_parameters()
    assert ours == capsys.readouterr().out
