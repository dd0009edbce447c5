"""tltorch.fine_tune, layer_groups, freeze_to, param_groups, lr_find: ULMFiT / fastai-style fine-tuning.

Tiny transformers models (hidden 32, 2-4 layers, random weights) built from configs; the schedules are
checked against the papers' formulas written out here, the optimizer's groups by spying on the AdamW that
fine_tune builds, unfreezing by the parameters' bits and flags epoch by epoch.
"""
import inspect
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tltorch
import tltorch.finetune as ft

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bert(layers=2, cls=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return (transformers.BertForSequenceClassification if cls else transformers.BertModel)(cfg)


def gpt2_config(**kw):
    return transformers.GPT2Config(vocab_size=60, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)


def token_task(n, seed, batch=32, pairs=False):
    """Two classes of sequences: class c draws its tokens from ids [10 + 20c, 30 + 20c) after a [CLS]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(0, 20, (n, 12), generator=g) + 10 + 20 * y[:, None]
    ids[:, 0] = 1
    if pairs:
        return [(ids[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    return [{"input_ids": ids[i:i + batch], "attention_mask": torch.ones_like(ids[i:i + batch]),
             "labels": y[i:i + batch]} for i in range(0, n, batch)]


def failing_loss(at):
    """Cross-entropy that raises on its `at`-th call."""
    calls = []

    def loss_fn(logits, labels):
        calls.append(1)
        if len(calls) == at:
            raise RuntimeError("boom")
        return F.cross_entropy(logits, labels)
    return loss_fn


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def names(group):
    return [n for n, _ in group]


# ---- schedules -------------------------------------------------------------------------------------------

def stlr_paper(t, T, cut_frac=0.1, ratio=32):
    """Howard & Ruder (2018), eq. 3, as printed."""
    cut = math.floor(T * cut_frac)
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    return (1 + p * (ratio - 1)) / ratio


@pytest.mark.parametrize("T", [100, 1000, 250])
def test_slanted_triangular_is_the_papers_formula(T):
    for t in sorted({0, 1, T // 20, T // 10 - 1, T // 10, T // 10 + 1, T // 2, T - 1}):
        assert ft.slanted_triangular(t, T) == pytest.approx(stlr_paper(t, T), rel=1e-12), t
    assert ft.slanted_triangular(0, T) == pytest.approx(1 / 32)
    assert ft.slanted_triangular(T // 10, T) == pytest.approx(1.0)
    assert ft.slanted_triangular(7, T, cut_frac=0.2, ratio=10) == pytest.approx(stlr_paper(7, T, 0.2, 10))


def test_slanted_triangular_short_runs_stay_positive():
    # T = 15: cut = 1 and the paper's line reaches p = 0 at t = 10; it stays at lr_max / ratio after
    factors = [ft.slanted_triangular(t, 15) for t in range(15)]
    assert factors[1] == 1.0 and min(factors) == pytest.approx(1 / 32) and factors[-1] == pytest.approx(1 / 32)
    assert [ft.slanted_triangular(t, 5) for t in range(2)] == [pytest.approx(1 / 32), 1.0]


def fastai_one_cycle(pos, pct=0.25, div=25.0, final_div=1e5):
    """fastai's combined_cos(pct, lr/div, lr, lr/final_div) with SchedCos(a, b)(q) = a + (1 + cos(pi(1-q)))(b-a)/2."""
    def sched_cos(a, b, q):
        return a + (1 + math.cos(math.pi * (1 - q))) * (b - a) / 2
    if pos < pct:
        return sched_cos(1 / div, 1.0, pos / pct)
    return sched_cos(1.0, 1 / final_div, (pos - pct) / (1 - pct))


def test_one_cycle_is_fastais():
    T = 200
    for t in (0, 10, 25, 49, 50, 51, 100, 150, 199):
        assert ft.one_cycle(t, T) == pytest.approx(fastai_one_cycle(t / T), rel=1e-12), t
    assert ft.one_cycle(0, T) == pytest.approx(1 / 25)
    assert ft.one_cycle(50, T) == pytest.approx(1.0)
    assert ft.one_cycle(25, T) == pytest.approx((1 / 25 + 1) / 2)
    assert ft.one_cycle(T, T) == pytest.approx(1e-5)


@pytest.mark.parametrize("schedule", ["slanted_triangular", "one_cycle", "constant"])
def test_fine_tune_applies_the_schedule_to_each_group(schedule):
    model = bert()
    train = token_task(96, 1)
    h = tltorch.fine_tune(model, train, epochs=2, lr=slice(1e-4, 1e-2), schedule=schedule, unfreeze="all",
                          progress=False)
    f = {"slanted_triangular": ft.slanted_triangular, "one_cycle": ft.one_cycle,
         "constant": lambda t, T: 1.0}[schedule]
    total = 2 * len(train)
    assert len(h.step_lr) == total
    for t, rates in enumerate(h.step_lr):
        assert rates == pytest.approx([b * f(t, total) for b in h.base_lr], rel=1e-12)
    assert h.lr == [h.step_lr[len(train) - 1], h.step_lr[-1]]


# ---- layer groups ----------------------------------------------------------------------------------------

def check_partition(model, groups):
    all_names = [n for n, _ in model.named_parameters()]
    assert sum((names(g) for g in groups), []) == all_names


def test_layer_groups_bert_and_minilm_style():
    model = bert(layers=4)
    groups = tltorch.layer_groups(model)
    check_partition(model, groups)
    assert len(groups) == 6
    assert all(n.startswith("bert.embeddings.") for n in names(groups[0]))
    for i in range(4):
        assert all(n.startswith(f"bert.encoder.layer.{i}.") for n in names(groups[1 + i]))
    assert names(groups[-1]) == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                 "classifier.bias"]
    chunked = tltorch.layer_groups(model, n=4)  # embeddings, layers 0-1, layers 2-3, head
    check_partition(model, chunked)
    assert [len(g) for g in chunked] == [len(groups[0]), 2 * len(groups[1]), 2 * len(groups[1]), 4]
    assert names(chunked[1])[-1].startswith("bert.encoder.layer.1.") and names(chunked[2])[0].startswith(
        "bert.encoder.layer.2.")
    # a sentence-transformers body (MiniLM) is a BertModel: pooler as its head group
    body = bert(layers=2, cls=False)
    groups = tltorch.layer_groups(body)
    check_partition(body, groups)
    assert len(groups) == 4 and all(n.startswith("pooler.") for n in names(groups[-1]))
    with pytest.raises(ValueError, match=r"n must be .*\[3, 6\]"):
        tltorch.layer_groups(model, n=7)
    with pytest.raises(ValueError, match="n must be"):
        tltorch.layer_groups(model, n=2)


def test_layer_groups_gpt2_llama_t5():
    lm = transformers.GPT2LMHeadModel(gpt2_config())  # lm_head tied to wte: counted once, in the embeddings
    groups = tltorch.layer_groups(lm)
    check_partition(lm, groups)
    assert names(groups[0]) == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert names(groups[-1]) == ["transformer.ln_f.weight", "transformer.ln_f.bias"] and len(groups) == 4
    clf = transformers.GPT2ForSequenceClassification(gpt2_config(num_labels=3))
    assert names(tltorch.layer_groups(clf)[-1])[-1] == "score.weight"

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2))
    groups = tltorch.layer_groups(llama)
    check_partition(llama, groups)
    assert names(groups[0]) == ["model.embed_tokens.weight"] and len(groups) == 5
    assert names(groups[-1]) == ["model.norm.weight", "lm_head.weight"]

    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=60, d_model=32, d_ff=64, num_layers=2,
                                                           num_heads=2, d_kv=16))
    groups = tltorch.layer_groups(t5)
    check_partition(t5, groups)
    assert names(groups[0]) == ["shared.weight"]
    assert all(n.startswith("encoder.block.1.") for n in names(groups[2]))
    assert names(groups[-1]) == ["encoder.final_layer_norm.weight"]


def test_unknown_structure_asks_for_groups():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="pass groups="):
        tltorch.layer_groups(mlp)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=60, d_model=32, d_ff=64,
                                                                       num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(ValueError, match="several: 'encoder.block', 'decoder.block'"):
        tltorch.layer_groups(t5)
    with pytest.raises(ValueError, match="pass groups="):
        tltorch.fine_tune(mlp, [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))], epochs=1, lr=1e-3,
                          progress=False)


# ---- discriminative rates and weight decay --------------------------------------------------------------

def test_param_groups_discriminative_rates_and_no_decay():
    model = bert(layers=2)
    pgs = tltorch.param_groups(model, slice(1e-5, 1e-3))
    rates = {}
    for g in pgs:
        rates.setdefault(g["layer_group"], set()).add(g["lr"])
    assert all(len(r) == 1 for r in rates.values()) and sorted(rates) == [0, 1, 2, 3]
    lrs = [rates[i].pop() for i in range(4)]
    assert lrs[0] == 1e-5 and lrs[-1] == 1e-3
    assert [lrs[i + 1] / lrs[i] for i in range(3)] == pytest.approx([100 ** (1 / 3)] * 3, rel=1e-12)
    decayed = {id(p) for g in pgs if g["weight_decay"] == 0.01 for p in g["params"]}
    plain = {id(p) for g in pgs if g["weight_decay"] == 0.0 for p in g["params"]}
    assert len(decayed) + len(plain) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        no_decay = name.endswith(".bias") or "LayerNorm" in name
        assert (id(p) in plain) == no_decay, name
    assert any("word_embeddings" in n for n, p in model.named_parameters() if id(p) in decayed)
    # fastai's readings of a float and of slice(hi)
    assert {g["lr"] for g in tltorch.param_groups(model, 3e-4)} == {3e-4}
    assert sorted({g["lr"] for g in tltorch.param_groups(model, slice(1e-2))}) == [1e-3, 1e-2]
    # a Llama's RMSNorm gains (1-D, a class named ...RMSNorm) get no decay either
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    plain = {id(p) for g in tltorch.param_groups(llama, 1e-3) if g["weight_decay"] == 0 for p in g["params"]}
    assert {n for n, p in llama.named_parameters() if id(p) in plain} == {
        "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight", "norm.weight"}


class SpyAdamW(tltorch.optim.AdamW):
    """tltorch's AdamW, keeping each instance and the keywords it was built with."""
    made = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        SpyAdamW.made.append((self, kw))


def test_fine_tune_optimizer_has_the_discriminative_groups(monkeypatch):
    SpyAdamW.made.clear()
    monkeypatch.setattr(ft, "AdamW", SpyAdamW)
    model = bert(layers=2)
    h = tltorch.fine_tune(model, token_task(64, 1), epochs=1, lr=slice(1e-5, 1e-3), weight_decay=0.05,
                          progress=False)
    ((opt, _),) = SpyAdamW.made
    want = {(g["name"], g["initial_lr"], g["weight_decay"]) for g in tltorch.param_groups(model, slice(1e-5, 1e-3),
                                                                                         weight_decay=0.05)}
    assert {(g["name"], g["initial_lr"], g["weight_decay"]) for g in opt.param_groups} == want
    assert h.base_lr == pytest.approx([1e-5, 1e-5 * 100 ** (1 / 3), 1e-5 * 100 ** (2 / 3), 1e-3], rel=1e-12)
    assert h.groups == ["embeddings", "layer 0", "layer 1", "head"]
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * ft.slanted_triangular(1, 2)) for g in opt.param_groups)


# ---- unfreezing ------------------------------------------------------------------------------------------

def flags_per_step(model, groups):
    """Which groups require grad, recorded at each training forward."""
    seen = []

    def hook(module, args, kwargs):
        if module.training:
            seen.append(tuple(any(p.requires_grad for _, p in g) for g in groups))
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_gradual_unfreezing_one_group_per_epoch():
    model = bert(layers=2)
    groups = tltorch.layer_groups(model)
    train = token_task(64, 1)
    seen = flags_per_step(model, groups)
    before = snapshot(model)
    h = tltorch.fine_tune(model, train, epochs=1, lr=slice(1e-3, 1e-2), progress=False)
    # epoch 1 trains the head alone: every other parameter keeps its bits
    assert changed(model, before) == set(names(groups[-1]))
    assert h.trainable_groups == [1] and set(seen) == {(False, False, False, True)}
    assert all(p.requires_grad for p in model.parameters())  # the flags as they were

    seen.clear()
    h = tltorch.fine_tune(model, train, epochs=5, lr=slice(1e-3, 1e-2), progress=False)
    per_epoch = [seen[i * len(train):(i + 1) * len(train)] for i in range(5)]
    assert [set(e) for e in per_epoch] == [{(False, False, False, True)}, {(False, False, True, True)},
                                           {(False, True, True, True)}, {(True, True, True, True)},
                                           {(True, True, True, True)}]
    assert h.trainable_groups == [1, 2, 3, 4, 4]


@pytest.mark.parametrize("unfreeze, trained", [(2, {2, 3}), ("all", {0, 1, 2, 3})])
def test_fixed_unfreezing(unfreeze, trained):
    model = bert(layers=2)
    groups = tltorch.layer_groups(model)
    before = snapshot(model)
    tltorch.fine_tune(model, token_task(64, 1), epochs=2, lr=1e-3, unfreeze=unfreeze, progress=False)
    moved = changed(model, before)
    for i, g in enumerate(groups):
        if i in trained:
            assert set(names(g)) & moved, i  # every trained group moved (token_type_embeddings row 1 may not)
        else:
            assert not set(names(g)) & moved, i


def test_frozen_parameters_stay_frozen_and_flags_come_back():
    model = bert(layers=2)
    emb = [p for n, p in model.named_parameters() if n.startswith("bert.embeddings.")]
    for p in emb:
        p.requires_grad_(False)
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    before = snapshot(model)
    with pytest.warns(UserWarning, match="embeddings"):
        tltorch.fine_tune(model, token_task(64, 1), epochs=1, lr=1e-3, unfreeze="all", progress=False)
    assert not any(n.startswith("bert.embeddings.") for n in changed(model, before))
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    # nothing trainable in the head (gradual starts there) is refused before anything changes
    for p in model.classifier.parameters():
        p.requires_grad_(False)
    for p in model.bert.pooler.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing would train"):
        tltorch.fine_tune(model, token_task(64, 1), epochs=1, lr=1e-3, progress=False)


def test_gradients_left_from_before_do_not_join_the_first_step():
    runs = []
    for leftover in (False, True):
        model = bert(layers=2)
        if leftover:
            for p in model.parameters():
                p.grad = torch.full_like(p, 100.0)
        torch.manual_seed(1)  # the same dropout masks in both runs
        tltorch.fine_tune(model, token_task(64, 1), epochs=1, lr=1e-3, unfreeze="all", progress=False)
        runs.append(snapshot(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_an_error_mid_way_restores_flags_and_modes():
    model = bert(layers=2)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        tltorch.fine_tune(model, token_task(64, 1), epochs=3, lr=1e-3, loss_fn=failing_loss(3), progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(not m.training for m in model.modules())  # eval, as from_pretrained leaves a model
    assert all(p.grad is None for p in model.parameters())


def test_freeze_to_as_fastai():
    model = bert(layers=2)
    groups = tltorch.layer_groups(model)

    def trainable():
        return [{p.requires_grad for _, p in g} == {True} for g in groups]
    tltorch.freeze_to(model, -1)
    assert trainable() == [False, False, False, True]
    tltorch.freeze_to(model, -2)
    assert trainable() == [False, False, True, True]
    tltorch.freeze_to(model, 1)
    assert trainable() == [False, True, True, True]
    tltorch.freeze_to(model, 0)
    assert trainable() == [True] * 4
    tltorch.freeze_to([model.bert.encoder.layer[1], model.classifier], -1)
    assert not any(p.requires_grad for p in model.bert.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    tltorch.freeze_to(groups, -4)
    assert trainable() == [True] * 4
    for bad in (4, -5, 1.0, True):
        with pytest.raises(ValueError, match="n must be"):
            tltorch.freeze_to(model, bad)


# ---- training end to end ---------------------------------------------------------------------------------

def test_fine_tune_learns_a_synthetic_task():
    model = bert(layers=2)
    h = tltorch.fine_tune(model, token_task(512, 1), token_task(256, 2), epochs=4, lr=slice(1e-3, 1e-2),
                          progress=False)
    assert len(h.train_loss) == len(h.val_loss) == len(h.val_acc) == 4
    assert h.val_acc[-1] > 0.9 and h.val_acc[0] < h.val_acc[-1]  # chance is 0.5
    assert h.train_loss[-1] < h.train_loss[0]


def test_pairs_and_default_cross_entropy_gpt2():
    """(ids, labels) batches: the model gets ids alone and the loss is cross-entropy on its logits."""
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(gpt2_config(num_labels=2))
    train, val = token_task(64, 1, pairs=True), token_task(64, 2, batch=16, pairs=True)
    h = tltorch.fine_tune(model, train, val, epochs=2, lr=slice(1e-3, 1e-2), progress=False)
    model.eval()
    with torch.no_grad():
        loss = sum(F.cross_entropy(model(x).logits, y, reduction="sum") for x, y in val) / 64
        acc = sum(int((model(x).logits.argmax(-1) == y).sum()) for x, y in val) / 64
    assert h.val_loss[-1] == pytest.approx(float(loss), rel=1e-5) and h.val_acc[-1] == acc


def test_language_model_batches_use_the_models_loss():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(gpt2_config())
    ids = torch.randint(0, 60, (32, 10), generator=torch.Generator().manual_seed(3))
    train = [{"input_ids": ids[i:i + 8], "labels": ids[i:i + 8]} for i in range(0, 32, 8)]
    h = tltorch.fine_tune(model, train, train[:2], epochs=2, lr=1e-3, unfreeze="all", schedule="one_cycle",
                          progress=False)
    model.eval()
    with torch.no_grad():
        want = sum(float(model(**b).loss) * 8 for b in train[:2]) / 16
    assert h.val_loss[-1] == pytest.approx(want, rel=1e-5)
    assert all(math.isnan(a) for a in h.val_acc)  # no accuracy for (batch, tokens, vocab) logits


def test_token_classifier_accuracy_is_per_token():
    """(batch, tokens, labels) logits of a token classifier: val_acc over the tokens whose label is not -100."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForTokenClassification(cfg)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(2, 60, (24, 9), generator=g)
    labels = ids % 3  # each token's class: its id mod 3
    labels[:, 0] = -100
    labels[torch.rand(24, 9, generator=g) < 0.2] = -100
    data = [{"input_ids": ids[i:i + 8], "labels": labels[i:i + 8]} for i in range(0, 24, 8)]
    h = tltorch.fine_tune(model, data, data, epochs=3, lr=3e-2, unfreeze="all", progress=False)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(input_ids=b["input_ids"]).logits.argmax(-1) for b in data])
    keep = labels != -100
    want = int((pred[keep] == labels[keep]).sum()) / int(keep.sum())
    assert h.val_acc[-1] == pytest.approx(want) and want > 0.5  # chance is 1/3


def test_explicit_groups_on_a_plain_model():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    before = snapshot(mlp)
    h = tltorch.fine_tune(mlp, data, data, epochs=6, lr=slice(1e-3, 3e-2), groups=[mlp[0], mlp[3]],
                          batch_size=16, unfreeze="all", progress=False)
    assert h.groups == ["0", "3"] and h.base_lr == [1e-3, 3e-2]
    assert changed(mlp, before) == {"0.weight", "0.bias", "3.weight", "3.bias"}  # mlp[1] is in no group
    assert h.val_acc[-1] > 0.8
    h = tltorch.fine_tune(mlp, data, epochs=1, lr=1e-3, groups=[["0.weight", "0.bias", "1.weight", "1.bias"],
                                                                ["3.weight", "3.bias"]], progress=False)
    assert h.groups == ["group 0", "group 1"]


def test_history_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model = bert(layers=2)
    h = tltorch.fine_tune(model, token_task(64, 1), token_task(32, 2), epochs=2, lr=slice(1e-4, 1e-2),
                          progress=False)
    assert isinstance(h, tltorch.History)
    fig = h.plot(tmp_path / "curves.png", title="tiny BERT")
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert [a.get_title() for a in fig.axes] == ["loss", "validation accuracy", "learning rate per group"]
    assert fig.axes[-1].get_yscale() == "log" and len(fig.axes[-1].get_lines()) == 4


# ---- lr_find ---------------------------------------------------------------------------------------------

def state(model):
    return ([t.detach().clone() for t in list(model.parameters()) + list(model.buffers())],
            [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def same_state(a, b):
    return (all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a[0], b[0])) and a[1:3] == b[1:3]
            and all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a[3], b[3])))


def test_lr_find_restores_the_model_and_suggests(tmp_path):
    model = bert(layers=2)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    model.bert.encoder.eval()
    before = state(model)
    r = tltorch.lr_find(model, token_task(128, 1), start_lr=1e-6, end_lr=1.0, num_it=40, progress=False)
    assert same_state(before, state(model))
    n = len(r.lrs)
    assert 10 <= n <= 40 and len(r.losses) == len(r.raw_losses) == n
    assert r.lrs == pytest.approx([1e-6 * 1e6 ** (i / 40) for i in range(n)], rel=1e-12)
    # the suggestion is the steepest descent of the smoothed loss over [n // 10, n - 5)
    lo, hi = n // 10, n - 5
    slopes = [(r.losses[i + 1] - r.losses[i]) / math.log(r.lrs[i + 1] / r.lrs[i]) for i in range(lo, hi - 1)]
    assert r.suggestion == r.lr_steep == r.lrs[lo + slopes.index(min(slopes))]
    assert r.lr_min == r.lrs[lo + r.losses[lo:hi].index(min(r.losses[lo:hi]))] / 10
    smooth, avg = [], 0.0
    for i, raw in enumerate(r.raw_losses):
        avg = 0.98 * avg + 0.02 * raw
        smooth.append(avg / (1 - 0.98 ** (i + 1)))
    assert r.losses == pytest.approx(smooth, rel=1e-12)
    if pytest.importorskip("matplotlib"):
        fig = r.plot(tmp_path / "lr.png")
        ax = fig.axes[0]
        assert ax.get_xscale() == "log" and "learning rate" in ax.get_xlabel() and "loss" in ax.get_ylabel()
        assert (tmp_path / "lr.png").stat().st_size > 0


def test_lr_find_stops_on_divergence_and_restores_after_an_error():
    model = bert(layers=2)
    before = state(model)
    r = tltorch.lr_find(model, token_task(64, 1), start_lr=1e-2, end_lr=1e6, num_it=60, unfreeze=1,
                        progress=False)
    assert len(r.lrs) < 60 and not r.losses[-1] <= 4 * min(r.losses[:-1])
    assert same_state(before, state(model))

    with pytest.raises(RuntimeError, match="boom"):
        tltorch.lr_find(model, token_task(64, 1), loss_fn=failing_loss(5), num_it=10, progress=False)
    assert same_state(before, state(model))


# ---- bad input -------------------------------------------------------------------------------------------

def test_bad_input():
    model = bert(layers=2)
    train = token_task(64, 1)
    flags = [p.requires_grad for p in model.parameters()]
    before = snapshot(model)

    def run(**kw):
        args = dict(epochs=1, lr=1e-3, progress=False)
        args.update(kw)
        return tltorch.fine_tune(model, args.pop("train", train), **args)
    for lr, err, msg in ((slice(1e-2, 1e-4), ValueError, "lo <= hi"), (slice(0, 1e-3), ValueError, "lr's lo"),
                         (slice(1e-4, -1.0), ValueError, "lr's hi"), (-1e-3, ValueError, "lr must"),
                         (float("nan"), ValueError, "lr must"), ("1e-3", TypeError, "lr must"),
                         (slice(1e-5, 1e-3, 2), ValueError, "no step")):
        with pytest.raises(err, match=msg):
            run(lr=lr)
    for unfreeze in (0, 5, -1, "some", True, 1.5):
        with pytest.raises(ValueError, match="unfreeze"):
            run(unfreeze=unfreeze)
    with pytest.raises(ValueError, match="train is empty"):
        run(train=[])
    with pytest.raises(TypeError, match="train must have a len"):
        run(train=(b for b in train))
    with pytest.raises(TypeError, match="train must be"):
        run(train="text")
    with pytest.raises(ValueError, match="val is empty"):
        run(val=[])
    with pytest.raises(ValueError, match="epochs"):
        run(epochs=0)
    with pytest.raises(ValueError, match="schedule"):
        run(schedule="cosine")
    with pytest.raises(ValueError, match="weight_decay"):
        run(weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"groups\[0\] and groups\[1\] share"):
        run(groups=[model.bert, model.bert.pooler])
    with pytest.raises(ValueError, match="not a parameter"):
        run(groups=[["bert.nope"]])
    with pytest.raises(TypeError, match="groups"):
        run(groups="bert")
    with pytest.raises(ValueError, match=r"groups must be None or an int in \[3, 4\]"):
        run(groups=5)
    with pytest.raises(TypeError, match="a batch must be"):
        run(train=[torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="no loss"):
        run(train=[{"input_ids": train[0]["input_ids"]}])
    with pytest.raises(ValueError, match="start_lr"):
        tltorch.lr_find(model, train, start_lr=1.0, end_lr=0.1, progress=False)
    with pytest.raises(ValueError, match="unfreeze"):
        tltorch.lr_find(model, train, unfreeze=9, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags and not changed(model, before)


def test_l2sp_goes_to_the_optimizer_only_if_it_takes_it(monkeypatch):
    model = bert(layers=2)
    if "l2sp" not in inspect.signature(tltorch.optim.AdamW).parameters:
        with pytest.raises(ValueError, match="l2sp needs"):
            tltorch.fine_tune(model, token_task(32, 1), epochs=1, lr=1e-3, l2sp=0.1, progress=False)
    with pytest.raises(ValueError, match="l2sp must"):
        tltorch.fine_tune(model, token_task(32, 1), epochs=1, lr=1e-3, l2sp=-1.0, progress=False)

    class WithL2SP(SpyAdamW):  # an AdamW that takes l2sp=
        def __init__(self, params, l2sp=0.0, **kw):
            super().__init__(params, **kw)
            self.l2sp = l2sp
    SpyAdamW.made.clear()
    monkeypatch.setattr(ft, "AdamW", WithL2SP)
    tltorch.fine_tune(model, token_task(32, 1), epochs=1, lr=1e-3, l2sp=0.1, progress=False)
    tltorch.fine_tune(model, token_task(32, 1), epochs=1, lr=1e-3, progress=False)
    assert [opt.l2sp for opt, _ in SpyAdamW.made] == [0.1, 0.0]


def test_groups_as_a_number_chunks_the_blocks():
    model = bert(layers=4)
    h = tltorch.fine_tune(model, token_task(32, 1), epochs=1, lr=slice(1e-4, 1e-2), groups=3, progress=False)
    assert h.groups == ["embeddings", "layers 0-3", "head"] and h.base_lr == pytest.approx([1e-4, 1e-3, 1e-2])


def test_readme_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("<!-- readme-example: fine_tune -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    env = dict(model=bert(layers=2), train_loader=token_task(64, 1), val_loader=token_task(32, 2))
    exec(compile(code, "README.md:fine_tune", "exec"), env)
    assert env["history"].trainable_groups == [1, 2, 3, 4]
    assert (tmp_path / "lr_find.png").exists() and (tmp_path / "fine_tune.png").exists()
