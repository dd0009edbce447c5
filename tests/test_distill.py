"""tltorch.distill and tltorch.make_student on tiny models built from configs (GPT-2, Llama, BERT; random
weights, synthetic tokens, nothing downloaded). The loss distill trains on is checked against the formula
on the full logits of both models in float64 (test_distillation.ref_loss):

    loss_i = (1 - alpha) T^2 D(softmax(z_t / T) || softmax(z_s / T)) + alpha CE(z_s, y_i),  the mean over
    counted tokens (causal LM: the next token, padding left out; masked LM: the masked positions) or
    labelled examples (classifiers).
"""
import copy
import json
import os
import warnings

import pytest
import torch

import tltorch
from test_distillation import readme_example, ref_loss
from test_finetune import one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)
from tltorch.cache import CacheError, StaleCacheWarning
from tltorch.distill import kept_layers

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 61


def gpt2(n_layer, seed, vocab=V, **kw):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=n_layer, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw))


def llama(n_layer, seed, vocab=V):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def bert(cls, n_layer, seed, **kw):
    torch.manual_seed(seed)
    return getattr(transformers, cls)(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=n_layer, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        **kw))


def sharpen(model, factor=6.0):
    """A teacher with something to teach: a random model's next-token distribution is nearly uniform."""
    with torch.no_grad():
        head = model.get_output_embeddings() if model.get_output_embeddings() is not None else model.classifier
        head.weight.mul_(factor)
    return model


def perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tokens(n, t, seed):
    return torch.randint(1, V, (n, t), generator=torch.Generator().manual_seed(seed))


def lm_batch(task, seed, n=4, t=12):
    """A dict batch: right padding on two rows (causal LM), or about a third of the tokens masked (MLM)."""
    ids = tokens(n, t, seed)
    if task == "clm":
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        mask[3, 5:] = 0
        return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.35
    chosen[0, 0] = True
    return {"input_ids": ids.masked_fill(chosen, 1), "labels": ids.masked_fill(~chosen, -100)}


def full_logits(model, batch):
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(**{k: v for k, v in batch.items() if k != "labels"}).logits


def reference(teacher, student, batch, task, **kw):
    """The distillation loss on the full float64 logits of both models."""
    zs, zt = full_logits(student, batch), full_logits(teacher, batch)
    if task == "classifier":
        return ref_loss(zs, zt, batch.get("labels"), **kw)
    if task == "clm":
        ids, mask = batch["input_ids"], batch["attention_mask"]
        y = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
        zs, zt = zs[:, :-1], zt[:, :-1]
    else:
        y = batch["labels"]
    return ref_loss(zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1]), y.reshape(-1), **kw)


CASES = {  # task, teacher, loss options
    "gpt2": ("clm", lambda: sharpen(gpt2(4, 0)), dict(temperature=2.0, alpha=0.5, divergence="kl")),
    "llama": ("clm", lambda: sharpen(llama(3, 0)), dict(temperature=3.0, alpha=0.25, divergence="jsd", beta=0.3)),
    "bert-mlm": ("mlm", lambda: sharpen(bert("BertForMaskedLM", 3, 0)),
                 dict(temperature=1.5, alpha=0.7, divergence="reverse_kl")),
    "bert-classifier": ("classifier", lambda: sharpen(bert("BertForSequenceClassification", 3, 0, num_labels=3), 20),
                        dict(temperature=2.0, alpha=0.5, divergence="kl")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_is_the_formula_on_full_logits(case):
    """distill's loss on a batch (before any step: history.initial's val_loss, and the first and only
    step's train_loss) equals the float64 formula on both models' full logits, for causal and masked LMs
    (fused through the vocabulary heads) and classifiers."""
    task, make_teacher, opts = CASES[case]
    teacher = make_teacher()
    student = perturb(tltorch.make_student(teacher, num_layers=2), seed=1)
    if task == "classifier":
        batch = dict(lm_batch("clm", 5), labels=torch.tensor([0, 2, -100, 1]))
    else:
        batch = lm_batch(task, 5)
    ref = reference(teacher, student, batch, task, **opts).item()
    # the held-out KL is the soft term alone at T = 1, over the same tokens (a classifier: every example)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"} if task == "classifier" else batch
    kl = reference(teacher, student, unlabelled, task, temperature=1.0, alpha=0.0, divergence="kl").item()
    history = tltorch.distill(teacher, student, batch, val=batch, batch_size=4, epochs=1, lr=1e-3,
                              progress=False, **opts)
    assert abs(history.initial["val_loss"] - ref) <= 1e-5 * abs(ref), (history.initial["val_loss"], ref)
    assert abs(history.train_loss[0] - ref) <= 1e-5 * abs(ref), (history.train_loss[0], ref)
    assert abs(history.initial["val_kl"] - kl) <= 1e-5 * kl, (history.initial["val_kl"], kl)
    assert history.task == task
    assert history.initial["val_loss"] != history.val_loss[0]  # the step changed the student


def test_held_out_kl_drops():
    """A 2-layer GPT-2 student from random weights gets closer to a 4-layer teacher on held-out text: its
    KL to the teacher falls by a quarter or more; the history has one entry per epoch and plots."""
    teacher = sharpen(gpt2(4, 0))
    student = gpt2(2, 3)
    history = tltorch.distill(teacher, student, tokens(64, 16, 1), val=tokens(16, 16, 2), epochs=4, lr=1e-2,
                              batch_size=8, progress=False)
    kls = [history.initial["val_kl"]] + history.val_kl
    assert kls[-1] < 0.75 * kls[0] and kls[-1] == min(kls), kls
    assert all(len(history[k]) == 4 for k in ("train_loss", "val_loss", "val_kl", "val_ppl", "lr", "time"))
    assert history.teacher["val_ppl"] > 0 and history.teacher_batches == [8 + 2] * 4  # no cache
    pytest.importorskip("matplotlib")
    fig = history.plot()
    assert len(fig.axes) == 3


def test_kept_layers():
    assert kept_layers(6, 12) == [0, 2, 4, 7, 9, 11]  # DistilBERT's
    assert kept_layers(2, 4) == [0, 3] and kept_layers(3, 4) == [0, 2, 3]
    assert kept_layers(1, 5) == [0] and kept_layers(5, 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_make_student_copies_the_kept_layers(family):
    make, blocks, count = {"gpt2": (lambda: gpt2(4, 0), "transformer.h", 4),
                           "llama": (lambda: llama(4, 0), "model.layers", 4),
                           "bert": (lambda: bert("BertForSequenceClassification", 4, 0, num_labels=3),
                                    "bert.encoder.layer", 4)}[family]
    teacher = make()
    before = state(teacher)
    for student, kept in ((tltorch.make_student(teacher, num_layers=3), kept_layers(3, count)),
                          (tltorch.make_student(teacher, layers=[1, 2]), [1, 2])):
        assert type(student) is type(teacher) and student.config.num_hidden_layers == len(kept)
        t_state, s_state = teacher.state_dict(), student.state_dict()
        pre = blocks + "."
        assert {k for k in s_state if not k.startswith(pre)} == {k for k in t_state if not k.startswith(pre)}
        for k, v in s_state.items():
            if k.startswith(pre):
                i, _, rest = k[len(pre):].partition(".")
                src = t_state[f"{pre}{kept[int(i)]}.{rest}"]
            else:
                src = t_state[k]
            assert v.dtype == src.dtype and torch.equal(v, src), k
            assert v.data_ptr() != src.data_ptr(), k  # a copy: training the student leaves the teacher alone
    assert same_state(before, teacher.state_dict()) and teacher.config.num_hidden_layers == count
    # every layer kept: the same model, the same outputs
    ids = tokens(2, 10, 0)
    whole = tltorch.make_student(teacher, num_layers=count)
    teacher.eval(), whole.eval()
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, whole(ids).logits)


def test_make_student_bad_input():
    teacher = gpt2(4, 0)
    for kw in ({}, {"num_layers": 2, "layers": [0, 1]}, {"num_layers": 0}, {"num_layers": 5}, {"num_layers": 2.0},
               {"layers": [2, 1]}, {"layers": [0, 4]}, {"layers": []}):
        with pytest.raises(ValueError, match="num_layers|layers"):
            tltorch.make_student(teacher, **kw)
    with pytest.raises(TypeError, match="teacher"):
        tltorch.make_student(torch.nn.Linear(2, 2), num_layers=1)


def count_calls(model):
    """Calls of model's forward (a pre-hook: distill stops a language model's forward at its head)."""
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_cache_teacher_runs_the_teacher_once(tmp_path):
    """With cache_teacher the teacher runs once per batch (train and val) in the first epoch, never
    after it, and not at all in a second call; another teacher makes the cache stale; the float16 states
    change the losses by float16's rounding only."""
    teacher = sharpen(gpt2(4, 0))
    student = gpt2(2, 3)
    data, val = tokens(24, 12, 1), tokens(8, 12, 2)
    kw = dict(val=val, epochs=3, lr=3e-3, batch_size=8, progress=False)
    plain = tltorch.distill(teacher, copy.deepcopy(student), data, **kw)
    calls = count_calls(teacher)
    cache = tmp_path / "teacher"
    first = tltorch.distill(teacher, copy.deepcopy(student), data, cache_teacher=cache, **kw)
    assert len(calls) == 3 + 1 and first.teacher_batches == [3, 0, 0]
    files = sorted(os.listdir(cache))
    assert len(files) == 5 and "manifest.json" in files
    import numpy as np
    assert all(np.load(cache / f).dtype == np.float16 for f in files if f.endswith(".npy"))
    for a, b in zip(plain.train_loss + plain.val_kl, first.train_loss + first.val_kl):
        assert abs(a - b) <= 2e-3 * abs(a), (plain, first)
    calls.clear()
    again = tltorch.distill(teacher, copy.deepcopy(student), data, cache_teacher=cache, **kw)
    assert calls == [] and again.train_loss == first.train_loss
    other = perturb(copy.deepcopy(teacher), seed=4)
    other_calls = count_calls(other)
    with pytest.warns(StaleCacheWarning):
        tltorch.distill(other, copy.deepcopy(student), data, cache_teacher=cache, **kw)
    assert len(other_calls) == 4 and len(os.listdir(cache)) == 5
    assert json.loads((cache / "manifest.json").read_text())["fingerprint"]["stored"] == "float16"
    victim = next(f for f in os.listdir(cache) if f.endswith(".npy"))
    (cache / victim).write_bytes((cache / victim).read_bytes()[:-8])
    with pytest.raises(CacheError, match="truncated or corrupt"):
        tltorch.distill(other, copy.deepcopy(student), data, cache_teacher=cache, **kw)


def test_cache_teacher_with_changing_batches_warns(tmp_path):
    """A shuffling DataLoader regroups the examples each epoch: the teacher runs for the new batches, and
    says why."""
    teacher, student = gpt2(2, 0), gpt2(1, 3)
    loader = torch.utils.data.DataLoader(tokens(16, 8, 1), batch_size=4, shuffle=True)
    calls = count_calls(teacher)
    with pytest.warns(UserWarning, match="unseen in the first epoch"):
        h = tltorch.distill(teacher, student, loader, epochs=2, cache_teacher=tmp_path / "c", progress=False)
    assert len(calls) > 4 and h.teacher_batches[0] == 4 and len(os.listdir(tmp_path / "c")) == 5


def test_teacher_left_unchanged():
    """The teacher, trainable and in train mode when given, comes back bit for bit, with its flags and
    modes; the student trains, and its flags and modes are restored too."""
    teacher = gpt2(3, 0)
    teacher.train()
    teacher.transformer.wpe.weight.requires_grad_(False)
    student = tltorch.make_student(teacher, num_layers=2)
    student.transformer.ln_f.weight.requires_grad_(False)
    student.eval()
    t_before, s_before = state(teacher), state(student)
    tltorch.distill(teacher, student, tokens(16, 10, 1), val=tokens(4, 10, 2), epochs=2, lr=1e-2, batch_size=4,
                    progress=False)
    assert same_state(t_before, teacher.state_dict())
    assert all(p.grad is None for p in teacher.parameters())
    assert [n for n, p in teacher.named_parameters() if not p.requires_grad] == ["transformer.wpe.weight"]
    assert all(m.training for m in teacher.modules())
    assert not same_state(s_before, student.state_dict())
    assert torch.equal(s_before["transformer.ln_f.weight"], student.transformer.ln_f.weight)  # frozen: kept
    assert [n for n, p in student.named_parameters() if not p.requires_grad] == ["transformer.ln_f.weight"]
    assert not any(m.training for m in student.modules())


def test_bad_input_names_the_argument():
    teacher = gpt2(2, 0)
    student = gpt2(1, 1)
    data = tokens(8, 8, 0)
    before = state(teacher), state(student)
    shared = gpt2(1, 1)
    shared.transformer.h[0] = teacher.transformer.h[1]
    frozen = gpt2(1, 1).requires_grad_(False)
    cases = [
        (dict(divergence="kl2"), ValueError, "divergence"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-2.0), ValueError, "temperature"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(schedule="cosine"), ValueError, "schedule"),
        (dict(cache_teacher=3), TypeError, "cache_teacher"),
        (dict(student=gpt2(1, 1, vocab=V - 3)), ValueError, "student's vocabulary"),
        (dict(student=gpt2(1, 1, vocab=V + 3), divergence="reverse_kl"), ValueError, "student's vocabulary"),
        (dict(student=bert("BertForSequenceClassification", 1, 1)), ValueError, "student"),
        (dict(student=bert("BertForMaskedLM", 1, 1)), ValueError, "student"),
        (dict(student=teacher), ValueError, "student"),
        (dict(student=shared), ValueError, "student shares parameters"),
        (dict(student=frozen), ValueError, "student has no parameter"),
        (dict(data=iter([data])), TypeError, "data"),
        (dict(data="text"), TypeError, "data"),
        (dict(data=[]), ValueError, "data"),
        (dict(val=[]), ValueError, "val"),
    ]
    for kw, error, words in cases:
        args = dict(student=student, data=data, progress=False)
        args.update(kw)
        with pytest.raises(error, match=words):
            tltorch.distill(teacher, args.pop("student"), args.pop("data"), **args)
    assert same_state(before[0], teacher.state_dict()) and same_state(before[1], student.state_dict())
    # a vocabulary jsd can bridge is fine
    tltorch.distill(teacher, gpt2(1, 1, vocab=V - 3), tokens(4, 8, 0).clamp(max=V - 4), divergence="jsd",
                    progress=False)
    # a masked LM needs its labels; a classifier the teacher's classes (refused before any step)
    mlm = bert("BertForMaskedLM", 2, 0)
    with pytest.raises(ValueError, match="data: a masked LM"):
        tltorch.distill(mlm, bert("BertForMaskedLM", 1, 1), data, progress=False)
    clf = bert("BertForSequenceClassification", 2, 0, num_labels=3)
    other = bert("BertForSequenceClassification", 1, 1, num_labels=2)
    other_before = state(other)
    with pytest.raises(ValueError, match="student gives"):
        tltorch.distill(clf, other, {"input_ids": data, "labels": torch.zeros(8, dtype=torch.long)}, progress=False)
    assert same_state(other_before, other.state_dict())


def test_classifier_body_and_head_module():
    """A classifier of one's own (a body + a tltorch head returning logits) distils from a BERT classifier,
    given (inputs, labels) pairs."""
    teacher = sharpen(bert("BertForSequenceClassification", 2, 0, num_labels=3), 20)

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.EmbeddingBag(V, 16)
            self.head = tltorch.nn.LinearCrossEntropy(16, 3)

        def forward(self, input_ids):
            return self.head.logits(self.embed(input_ids))

    torch.manual_seed(0)
    student = Small()
    pairs = [(tokens(8, 10, i), torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(i)))
             for i in range(6)]
    h = tltorch.distill(teacher, student, pairs[:4], val=pairs[4:], epochs=5, lr=3e-2, progress=False)
    assert h.val_kl[-1] < 0.7 * h.initial["val_kl"], h
    assert 0.0 <= h.val_acc[-1] <= 1.0 and 0.0 <= h.teacher["val_acc"] <= 1.0


def test_readme_example_runs(tmp_path, monkeypatch):
    """README's 'Distilling a smaller student' snippet on a tiny GPT-2."""
    monkeypatch.chdir(tmp_path)
    teacher = sharpen(gpt2(4, 0))
    env = dict(teacher=teacher, train_ids=tokens(32, 12, 1), val_ids=tokens(8, 12, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCacheWarning)
        exec(compile(readme_example("distill_workflow"), "README.md:distill_workflow", "exec"), env)
    history, student = env["history"], env["student"]
    assert student.config.n_layer == 2 and len(history.train_loss) == 3
    assert history.teacher_batches[1:] == [0, 0]


def test_make_student_of_a_body_built_without_its_pooler():
    """A BertModel built with add_pooling_layer=False (as sentence encoders are loaded) gives a student
    without one too, its kept layers copied bit for bit."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64)
    teacher = transformers.BertModel(cfg, add_pooling_layer=False)
    student = tltorch.make_student(teacher, 2)
    assert student.pooler is None and student.config.num_hidden_layers == 2
    kept = kept_layers(2, 4)
    for i, k in enumerate(kept):
        for (n, a), (_, b) in zip(student.encoder.layer[i].state_dict().items(),
                                  teacher.encoder.layer[k].state_dict().items()):
            assert torch.equal(a, b), n
