"""Adapter files that are hostile, damaged or half-written, and PEFT / Trainer habits: rank and alpha
patterns matched as PEFT matches them (in bounded time), numbers and dtypes from files checked, failed
loads that leave the model as it was, task types, Trainer.save_model, orthogonal init, frozen bases."""
import copy
import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import tltorch
import tltorch.lora
from tltorch import LoraConfig, add_lora, load_adapter, merge_lora, save_adapter
from tltorch._pattern import PatternKey
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


# ---- rank_pattern / alpha_pattern keys -----------------------------------------------------------------

def peft_match(key, path):
    """PEFT's rule (peft.utils.other.get_pattern_key)."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


KEYS = ["layers.1", "1", "layers\\.1", "ayers.1", "layers.1.", "query", "q_proj", "layers\\.\\d+\\.query",
        "(q|v)_proj", "layers.1|layers.2", "^layers.1", "^model.layers.0", "\\d", ".*query", "blocks.1.query",
        "[0-9]{2}", "layers.(0|10)", "ers.1", "(?:self_attn.)?q_proj", "layers\\.1$", "\\bquery",
        "q(?s:.)proj", "layers.1)(", "a)|(q_proj"]
PATHS = ["layers.1", "layers.10", "layers.11", "model.layers.1", "layers.2", "blocks.1.query", "blocks.1xquery",
         "blocks.10.query", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "q_proj",
         "xq_proj", "layers.1.query", "query", "a", "1", "layers", "model.layers.0", "layers.1\n", "a\nb.q_proj"]


@pytest.mark.parametrize("key", KEYS)
def test_pattern_keys_match_as_peft(key):
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error:
        with pytest.raises(ValueError):
            PatternKey(key)
        return
    pk = PatternKey(key)
    for path in PATHS:
        assert pk.matches(path) == peft_match(key, path), (key, path)


def test_pattern_keys_agree_with_re_on_random_regexes():
    """Random regexes (groups, alternation, classes, anchors, greedy/lazy/counted repeats, scoped
    flags) against random strings: the NFA's answer is re.match's."""
    rng = random.Random(0)
    atoms = ["a", "b", ".", "\\.", "[ab]", "[^a]", "\\d", "\\w", "\\W", "\\s", "1", "_", "\\b", "\\B", "^", "$",
             "\\A", "\\Z", "[a-c1]", "[^\\d.]", "\n"]
    anchors = ("^", "$", "\\b", "\\B", "\\A", "\\Z")

    def gen(depth=0, nested=0):
        quantified = nested < 2 and rng.random() < 0.3
        inner = nested + quantified
        r = rng.random()
        if depth > 3 or r < 0.4:
            x = rng.choice(atoms)
        elif r < 0.6:
            x = "(" + rng.choice(["", "?:", "?s:", "?m:", "?a:"]) + gen(depth + 1, inner) + ")"
        elif r < 0.75:
            x = "(?:" + gen(depth + 1, inner) + "|" + gen(depth + 1, inner) + ")"
        else:
            x = gen(depth + 1, inner) + gen(depth + 1, inner)
        if quantified and x not in anchors:
            x = "(?:" + x + ")" + rng.choice(["*", "+", "?", "{2}", "{1,3}", "*?", "+?", "??", "{0,2}?"])
        return x

    checked = 0
    while checked < 1500:
        key = gen()
        try:
            want = re.compile(rf"(.*\.)?({key})$")
        except re.error:
            continue
        pk = PatternKey(key)
        for _ in range(6):
            s = "".join(rng.choice("ab.1_ \n") for _ in range(rng.randint(0, 8)))
            assert pk.matches(s) == (want.match(s) is not None), (key, s)
        checked += 1


def test_hostile_pattern_loads_in_bounded_time(tmp_path):
    """re.match("(.*\\.)?((.|.)*Z)$", path) backtracks through 2^len(path) ways on a long path; a load
    must finish, and apply the keys that match."""
    long = "a_module_name_long_enough_for_exponential_backtracking_to_never_end"
    script = f"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from torch import nn
import tltorch
torch.manual_seed(0)
model = nn.Sequential()
model.add_module("{long}", nn.Linear(4, 4))
model.add_module("other", nn.Linear(4, 4))
tltorch.add_lora(model, tltorch.LoraConfig(r=2, lora_alpha=2, target_modules=["{long}", "other"]))
tltorch.save_adapter(model, sys.argv[1])
path = sys.argv[1] + "/adapter_config.json"
cfg = json.load(open(path))
cfg["alpha_pattern"] = {{"(.|.)*Z": 9.0, "(.|.)*never_(.|.)*d": 6.0}}
json.dump(cfg, open(path, "w"))
w_path = sys.argv[1] + "/adapter_model.safetensors"  # as another tool writes it: no tltorch digest
save_file(load_file(w_path), w_path, metadata={{"format": "pt"}})
fresh = nn.Sequential()
fresh.add_module("{long}", nn.Linear(4, 4))
fresh.add_module("other", nn.Linear(4, 4))
tltorch.load_adapter(fresh, sys.argv[1])
print(json.dumps({{n: m.lora_alpha for n, m in fresh.named_modules() if isinstance(m, tltorch.nn.LoRALinear)}}))
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(tltorch.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    alphas = json.loads(out.stdout.strip().splitlines()[-1])
    assert alphas == {long: 6.0, "other": 2}  # "(.|.)*Z" matches nothing; the second key matches the long one


@pytest.mark.parametrize("key", ["(a)\\1", "(?=layers)layers.1", "(?<!x)layers.1", "(?>layers).1", "layers.1++",
                                 "(?i:LAYERS).1", "(?:(?:a{30}){30}){30}", "(a", "(?P<x>a)(?(x)b|c)"])
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_refused_pattern_keys(tmp_path, key, field):
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        LoraConfig(**CFG, **{field: {key: 2}})
    base = make_stack()
    save_adapter(trained(base), tmp_path)
    rewrite(tmp_path, config={field: {"layers.2": 2, key: 2}})
    for model in (copy.deepcopy(base), add_lora(copy.deepcopy(base), LoraConfig(**CFG))):
        snap = snapshot(model)
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            load_adapter(model, tmp_path)
        assert_unchanged(model, snap)


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match:RuntimeWarning")
def test_patterns_match_path_suffixes_not_substrings(tmp_path):
    """Key "1" and key "layers.1" name layers.1 only: not layers.10, whose name contains both. In
    add_lora, in a fresh load and in a load into a model with adapters, and as PEFT resolves them."""
    peft = pytest.importorskip("peft")
    base = make_stack()
    targets = ["layers.1", "layers.2", "layers.10"]
    patterns = dict(alpha_pattern={"1": 10.0, "ayers.2": 7.0}, rank_pattern={"layers.1": 4})  # "ayers.2": no layer
    model = add_lora(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=targets, **patterns))
    ranks = {n: (m.r, m.lora_alpha) for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert ranks == {"layers.1": (4, 10.0), "layers.2": (2, 4), "layers.10": (2, 4)}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                                  **patterns))
    theirs = {n.removeprefix(PREFIX): (m.r["default"], m.lora_alpha["default"])
              for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert theirs == ranks

    randomize(model, classifier=False)
    save_adapter(model, tmp_path)
    rewrite(tmp_path, config={"alpha_pattern": {"1": 10.0}})  # PEFT's key, not save_adapter's escaped path
    want = {"layers.1": 10.0 / 4, "layers.2": 4 / 2, "layers.10": 4 / 2}
    fresh = load_adapter(copy.deepcopy(base), tmp_path)
    assert scalings(fresh) == want
    torch.testing.assert_close(fresh(X), model(X), rtol=0, atol=0)
    adapted = copy.deepcopy(base)
    adapted.layers[1] = LoRALinear(adapted.layers[1], r=4)
    adapted.layers[2] = LoRALinear(adapted.layers[2], r=2)
    adapted.layers[10] = LoRALinear(adapted.layers[10], r=2)
    load_adapter(adapted, tmp_path)
    assert scalings(adapted) == want
    torch.testing.assert_close(adapted(X), model(X), **TOL)


# ---- numbers, dtypes and half-written pairs ------------------------------------------------------------

def test_load_into_adapted_model_applies_alpha_pattern(tmp_path):
    base = make_stack()
    model = trained(base, alpha_pattern={"layers.10": 11.0, "layers.2": 1.5})
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alpha_pattern"]
    other = add_lora(copy.deepcopy(base), LoraConfig(**CFG))  # alpha 4 everywhere
    load_adapter(other, tmp_path)
    assert scalings(other) == scalings(model)
    torch.testing.assert_close(other(X), model(X), rtol=0, atol=0)


def test_lora_dropout_read_from_file(tmp_path):
    base = make_stack()
    save_adapter(trained(base, lora_dropout=0.25), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.25 and LoraConfig.from_dict(cfg).lora_dropout == 0.25
    fresh = load_adapter(copy.deepcopy(base), tmp_path)
    drops = {m.lora_dropout for m in fresh.modules() if isinstance(m, LoRALinear)}
    assert drops == {0.25}


BAD_NUMBERS = [
    {"alpha_pattern": {"layers.2": float("nan")}}, {"alpha_pattern": {"layers.10": float("inf")}},
    {"alpha_pattern": {"layers.2": "4"}}, {"alpha_pattern": {"layers.2": True}}, {"alpha_pattern": [1]},
    {"rank_pattern": {"layers.2": 0}}, {"rank_pattern": {"layers.2": 2.5}}, {"rank_pattern": {"layers.2": -2}},
    {"lora_alpha": float("nan")}, {"lora_alpha": float("-inf")}, {"r": 4.0}, {"r": -1},
    {"lora_dropout": float("nan")}, {"lora_dropout": 1.5}, {"use_rslora": "yes"}, {"task_type": "CLASSIFY"},
]


@pytest.mark.parametrize("defect", BAD_NUMBERS, ids=lambda d: json.dumps(d))
@pytest.mark.parametrize("into", ["fresh", "adapted"])
def test_bad_numbers_in_file_refused(tmp_path, defect, into):
    base = make_stack()
    save_adapter(trained(base), tmp_path)
    rewrite(tmp_path, config=defect)
    model = copy.deepcopy(base) if into == "fresh" else add_lora(copy.deepcopy(base), LoraConfig(**CFG))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


FAILURES = {
    # each fails after the first adapted layer has been read: nothing may stay changed
    "nan alpha, 2nd layer": dict(config={"alpha_pattern": {"layers\\.2": float("nan")}}),
    "str alpha, 2nd layer": dict(config={"alpha_pattern": {"layers\\.2": "x"}}),
    "odd rank, orthogonal": dict(config={"init_lora_weights": "orthogonal"},
                                 tensors={PREFIX + "layers.10.lora_A.weight": torch.zeros(3, 6),
                                          PREFIX + "layers.10.lora_B.weight": torch.zeros(6, 3)}),
    "int32 lora_B, last layer": dict(tensors={PREFIX + "layers.10.lora_B.weight": torch.ones(6, 2, dtype=torch.int32)}),
    "classifier shape": dict(tensors={PREFIX + "classifier.weight": torch.zeros(4, 6)}),
    "bias missing": dict(tensors={PREFIX + "layers.10.base_layer.bias": None}),
    "unknown layer": dict(tensors={PREFIX + "nowhere.lora_A.weight": torch.zeros(2, 6)}),
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("into", ["fresh", "adapted"])
def test_failed_load_leaves_model_as_it_was(tmp_path, failure, into):
    base = make_stack()
    save_adapter(trained(base), tmp_path)
    rewrite(tmp_path, **FAILURES[failure])
    model = copy.deepcopy(base) if into == "fresh" else add_lora(copy.deepcopy(base), LoraConfig(**CFG))
    if into == "adapted":
        randomize(model, seed=5)
    snap = snapshot(model)
    y = model(X)
    with pytest.raises(ValueError):
        load_adapter(model, tmp_path)
    assert_unchanged(model, snap)
    torch.testing.assert_close(model(X), y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_non_floating_adapter_tensors_refused(tmp_path, dtype):
    base = make_stack()
    save_adapter(trained(base), tmp_path)
    key = PREFIX + "layers.2.lora_A.weight"
    rewrite(tmp_path, tensors={key: torch.ones(2, 6).to(dtype)})
    for model in (copy.deepcopy(base), add_lora(copy.deepcopy(base), LoraConfig(**CFG))):
        snap = snapshot(model)
        with pytest.raises(ValueError, match=re.escape(repr(key))):
            load_adapter(model, tmp_path)
        assert_unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_floating_dtypes_cast(tmp_path, dtype):
    """As PEFT: the file's floating tensors take the model's dtype (float32 here)."""
    from safetensors.torch import load_file

    base = make_stack()
    save_adapter(trained(base), tmp_path)
    want = load_adapter(copy.deepcopy(base), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    rewrite(tmp_path, tensors={k: v.to(dtype) for k, v in tensors.items()})
    got = load_adapter(copy.deepcopy(base), tmp_path)
    loaded = [n for n, _ in want.named_parameters() if ".lora_" in n or n.startswith("classifier.")]
    assert len(loaded) == 8
    for n in loaded:
        p, q = got.get_parameter(n), want.get_parameter(n)
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q.to(dtype).float(), rtol=0, atol=0)


def test_interrupted_save_is_refused(tmp_path, monkeypatch):
    """A save killed between its two files leaves new weights beside the old config: load refuses it."""
    base = make_stack()
    old = trained(base, lora_alpha=16)
    save_adapter(old, tmp_path)
    new = trained(base, seed=7, lora_alpha=2)
    real = tltorch.lora.atomic_write

    def killed_before_config(path, data, mode=None):
        if os.path.basename(path) == "adapter_config.json":
            raise KeyboardInterrupt
        real(path, data, mode=mode)

    monkeypatch.setattr(tltorch.lora, "atomic_write", killed_before_config)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(new, tmp_path)
    monkeypatch.setattr(tltorch.lora, "atomic_write", real)
    for model in (copy.deepcopy(base), add_lora(copy.deepcopy(base), LoraConfig(**CFG))):
        snap = snapshot(model)
        with pytest.raises(ValueError, match="not the configuration"):
            load_adapter(model, tmp_path)
        assert_unchanged(model, snap)

    save_adapter(new, tmp_path)  # the completed save loads
    torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path)(X), new(X), rtol=0, atol=0)
    # the fields the digest leaves out may still be edited by hand
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(base_model_name_or_path="/models/elsewhere", inference_mode=False, target_modules=["layers.2"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path)(X), new(X), rtol=0, atol=0)


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
    with pytest.raises(ValueError, match="even"):
        add_lora(copy.deepcopy(base), LoraConfig(r=4, rank_pattern={"layers.1": 3}, target_modules=["layers.1"],
                                                 init_lora_weights="orthogonal"))


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


TASKS = [("SEQ_CLS", "BertForSequenceClassification", "classifier", 3),
         ("TOKEN_CLS", "BertForTokenClassification", "classifier", 3),
         ("QUESTION_ANS", "BertForQuestionAnswering", "qa_outputs", 2)]


@pytest.mark.parametrize("targets", [["query", "value"], "all-linear"], ids=["query,value", "all-linear"])
@pytest.mark.parametrize("task, cls, head, labels", TASKS, ids=[t[0] for t in TASKS])
def test_task_type_trains_and_saves_head(tmp_path, task, cls, head, labels, targets):
    peft = pytest.importorskip("peft")
    base = _bert(cls, num_labels=labels)
    model = add_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, task_type=task))
    assert type(getattr(model, head)) is nn.Linear  # trained whole, no adapter
    assert all(p.requires_grad for p in getattr(model, head).parameters())
    if targets != "all-linear" or task == "SEQ_CLS":
        # (PEFT's get_peft_model fails on the others: its "all-linear" adapts the head that its task
        # type then wraps as a module to save; tltorch leaves the head to be trained whole.)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets, task_type=task))
        assert tltorch.trainable_parameters(model)[0] == pm.get_nb_trainable_parameters()[0]

    perturb(model, seed=4)
    want = outputs(model)
    assert not torch.allclose(want, outputs(base), atol=1e-3)
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(outputs(theirs), want, **TOL)
    torch.testing.assert_close(outputs(load_adapter(copy.deepcopy(base), tmp_path)), want, rtol=0, atol=0)


def test_task_type_without_its_head():
    with pytest.raises(ValueError, match="SEQ_CLS"):
        add_lora(make_stack().layers, LoraConfig(target_modules=["0"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="task_type"):
        LoraConfig(target_modules=["q"], task_type="seq_cls")
    # CAUSAL_LM trains no module whole
    net = add_lora(make_stack(), LoraConfig(target_modules=["layers.0"], task_type="CAUSAL_LM"))
    assert not any(p.requires_grad for p in net.classifier.parameters())


def test_trainer_save_model_writes_the_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = _bert("BertForSequenceClassification")
    model = add_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 50, (7,), generator=g), "attention_mask": torch.ones(7, dtype=torch.long),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=5e-2, use_cpu=True, report_to=[], save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    model.eval()
    want = outputs(model)
    assert not torch.allclose(want, outputs(base), atol=1e-3)  # the adapters and the classifier trained
    files = set(os.listdir(tmp_path / "out"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    torch.testing.assert_close(outputs(load_adapter(copy.deepcopy(base), tmp_path / "out")), want, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    torch.testing.assert_close(outputs(theirs), want, **TOL)

    twin = copy.deepcopy(model)  # a copy saves its own adapter
    perturb(twin, seed=8)
    twin.save_pretrained(tmp_path / "twin")
    torch.testing.assert_close(outputs(load_adapter(copy.deepcopy(base), tmp_path / "twin")), outputs(twin),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)

    merge_lora(model, unload=True)  # a plain model again: the class's own save_pretrained
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "full")
    again = type(base).from_pretrained(tmp_path / "full").eval()
    torch.testing.assert_close(outputs(again), want, **TOL)


def test_failed_add_lora_leaves_transformers_model_as_it_was():
    base = _bert("BertForSequenceClassification")
    snap = snapshot(base)
    with pytest.raises(ValueError, match="even"):
        add_lora(base, LoraConfig(r=4, rank_pattern={"value": 3}, target_modules=["query", "value"],
                                  init_lora_weights="orthogonal"))
    assert_unchanged(base, snap)
    assert "save_pretrained" not in base.__dict__
