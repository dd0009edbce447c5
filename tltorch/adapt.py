"""adapt_body: specialise a pretrained transformers body on unlabelled text before a head is trained
(ULMFiT's middle step), with the model's own self-supervised objective and tltorch's fused vocabulary head.

    mlm   masked language modelling (BERT, RoBERTa, DistilBERT): transformers' DataCollatorForLanguageModeling
          masks the tokens; only masked positions count.
    span  T5's span corruption (T5ForConditionalGeneration): random_spans_noise_mask picks the spans, each
          replaced by a sentinel <extra_id_k> in the inputs; the targets are the spans behind their sentinels.
    clm   causal language modelling (GPT2LMHeadModel, LlamaForCausalLM, ...): every next token counts.

The vocabulary projection and its cross-entropy are one call of tltorch.functional.linear_cross_entropy on
the hidden states (after the head's own transform, e.g. BERT's dense + gelu + LayerNorm): the B x T x V
logits are never materialised.
"""
import math
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fit import SCHEDULES, _lr_factor
from .functional import linear_cross_entropy
from .lora import LoraConfig, _remove_layers, add_lora
from .optim import AdamW

OBJECTIVES = ("mlm", "span", "clm")
_CHECK_TOKENS = 64  # tokens per sequence of the batch on which the fused loss is checked against the model's own


class AdaptReport(dict):
    """What adapt_body did, readable as keys or attributes (like fit_head's History): "objective"; per
    epoch "train_loss" (the mean loss over the epoch's target tokens), "val_loss" (held-out loss after the
    epoch), "lr" (at the epoch's end), "time" (seconds since the start) and "tokens" (target tokens
    trained on); "val_loss_before" / "val_loss_after" and "val_perplexity_before" /
    "val_perplexity_after" (exp of the loss: for mlm the perplexity of the masked tokens, for span of the
    targets) on the held-out text, None without val; "steps", "trainable" (parameters trained) and "head"
    (the masked-LM head built for a bare BertModel, else None)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ---- T5's span corruption ------------------------------------------------------------------------------

def _span_counts(length: int, noise_density: float, mean_noise_span_length: float):
    """(noise tokens, noise spans) of a sequence of `length` tokens, as T5 rounds them; ValueError where
    the kept tokens are too few to separate the spans."""
    n = max(length, 2)
    num_noise = min(max(int(round(n * noise_density)), 1), n - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    if num_spans > n - num_noise:
        raise ValueError(f"noise_density {noise_density} and mean_noise_span_length {mean_noise_span_length} give "
                         f"{num_spans} noise spans in {n} tokens but only {n - num_noise} kept tokens to separate them")
    return num_noise, num_spans


def _random_segmentation(num_items: int, num_segments: int, generator) -> Tensor:
    """A uniformly random composition of num_items into num_segments positive lengths: the segment
    boundaries are num_segments - 1 distinct cuts among the num_items - 1 gaps (T5's shuffle of
    arange(num_items - 1) < num_segments - 1)."""
    cuts = torch.randperm(num_items - 1, generator=generator)[:num_segments - 1].add_(1).sort().values
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.full((1,), num_items, dtype=torch.long)])
    return bounds.diff()


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """T5's random_spans_noise_mask (random_roll=False): a (length,) bool mask, True at noise tokens.

    round(length * noise_density) tokens (at least 1, at most length - 1) are noise, in
    round(noise / mean_noise_span_length) spans (at least 1); the noise and the non-noise tokens are
    each split into that many spans of random positive lengths, interleaved non-noise first, so the
    mask starts with a kept token and ends with a noise span."""
    num_noise, num_spans = _span_counts(length, noise_density, mean_noise_span_length)
    n = max(length, 2)
    noise = _random_segmentation(num_noise, num_spans, generator)
    keep = _random_segmentation(n - num_noise, num_spans, generator)
    lengths = torch.stack([keep, noise], 1).flatten()
    return torch.tensor([False, True]).repeat(num_spans).repeat_interleave(lengths)[:length]


def _to_sentinels(tokens: Tensor, mask: Tensor, sentinels: Tensor) -> Tensor:
    """tokens with each run of masked tokens replaced by one sentinel: the k-th run by sentinels[k]."""
    start = mask.clone()
    start[1:] &= ~mask[:-1]
    ids = sentinels[(start.cumsum(0) - 1).clamp_(min=0)]
    return torch.where(start, ids, tokens)[~mask | start]


def span_corruption(blocks: Tensor, sentinels: Tensor, eos_id: int, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0, generator: Optional[torch.Generator] = None):
    """T5's span-corruption pair for each row of blocks (B, L) of token ids: (inputs, targets).

    inputs: the row with each noise span replaced by its sentinel (sentinels[k] for the k-th span,
    <extra_id_k>), then eos_id; targets: each span behind its sentinel, sentinels[0] span_0 sentinels[1]
    span_1 ..., then eos_id (T5's noise_span_to_unique_sentinel and nonnoise_span_to_unique_sentinel).
    Every row has the same counts, so inputs are (B, L - noise + spans + 1), targets (B, noise + spans + 1).
    """
    inputs, targets = [], []
    eos = torch.full((1,), eos_id, dtype=blocks.dtype)
    for row in blocks:
        mask = random_spans_noise_mask(row.numel(), noise_density, mean_noise_span_length, generator)
        inputs.append(torch.cat([_to_sentinels(row, mask, sentinels), eos]))
        targets.append(torch.cat([_to_sentinels(row, ~mask, sentinels), eos]))
    return torch.stack(inputs), torch.stack(targets)


def _raw_length(max_length: int, noise_density: float, mean_noise_span_length: float) -> int:
    """The longest block whose corrupted inputs (eos included) fit in max_length tokens (T5's
    compute_input_and_target_lengths)."""
    def inputs_length(L):
        noise, spans = _span_counts(L, noise_density, mean_noise_span_length)
        return L - noise + spans + 1
    L = 2
    while inputs_length(L + 1) <= max_length:
        L += 1
    return L


# ---- the model's vocabulary head --------------------------------------------------------------------

class _Head:
    """How one objective runs on one model: features(batch) -> (x, target) rows for the fused head
    (weight, bias, softcap), and the parameters it trains beyond the model's."""

    def __init__(self, objective, features, weight, bias=None, softcap=None, built=None, own_loss=True):
        self.objective, self.features = objective, features
        self.weight, self.bias, self.softcap = weight, bias, softcap
        self.built = built          # a head module made here (a bare BertModel's), trained with the body
        self.own_loss = own_loss    # whether model(input_ids, labels=...).loss is the same objective

    def loss(self, batch: dict, reduction: str = "mean"):
        """(loss, number of target tokens) of a batch."""
        x, target = self.features(batch)
        n = int((target != -100).sum())
        if n == 0:
            return None, 0
        return linear_cross_entropy(x, self.weight, target, self.bias, reduction=reduction,
                                    softcap=self.softcap), n


def _last_hidden(out) -> Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _mlm_parts(model):
    """(transform, decoder) of a masked-LM model's vocabulary head, for the layouts of BERT
    (cls.predictions), RoBERTa (lm_head) and DistilBERT (vocab_*); None for others."""
    pred = getattr(getattr(model, "cls", None), "predictions", None)
    if pred is not None and hasattr(pred, "transform") and hasattr(pred, "decoder"):
        return pred.transform, pred.decoder
    lm = getattr(model, "lm_head", None)
    if lm is not None and all(hasattr(lm, a) for a in ("dense", "layer_norm", "decoder")):
        return (lambda x: lm.layer_norm(F.gelu(lm.dense(x)))), lm.decoder
    if all(hasattr(model, a) for a in ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector")):
        return (lambda x: model.vocab_layer_norm(model.activation(model.vocab_transform(x)))), model.vocab_projector
    return None


def _bert_mlm_head(body: nn.Module) -> nn.Module:
    """BERT's masked-LM head for a bare BertModel, as BertForMaskedLM builds and initialises it: a new
    dense + gelu + LayerNorm transform (normal(0, initializer_range) weights) and a zero output bias,
    with the decoder's weight the body's word embeddings (tied, as in BertForMaskedLM)."""
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead
    config = body.config
    emb = body.get_input_embeddings().weight
    with torch.device("meta"):  # no V x D decoder weight is allocated: it is the embeddings'
        head = BertOnlyMLMHead(config)
    pred = head.predictions
    decoder = pred.decoder
    pred.decoder = None
    head.to_empty(device=emb.device)
    head.to(emb.dtype)
    with torch.no_grad():
        pred.transform.dense.weight.normal_(0.0, config.initializer_range)
        pred.transform.dense.bias.zero_()
        pred.transform.LayerNorm.weight.fill_(1.0)
        pred.transform.LayerNorm.bias.zero_()
        pred.bias.zero_()
    decoder.weight, decoder.bias = emb, pred.bias
    pred.decoder = decoder
    return head


_AUTO = {"mlm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "clm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
         "span": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"}


def _lm_class(model, objective: str) -> Optional[str]:
    """The name of the transformers class with the objective's head for this model's type, if any."""
    from transformers.models.auto import modeling_auto
    return getattr(modeling_auto, _AUTO[objective], {}).get(getattr(model.config, "model_type", None))


def _objective_of(model) -> str:
    """The model's own objective: span for an encoder-decoder; mlm for a masked-LM model (or a bare body
    whose type has one); clm for a causal LM (or a bare body whose type has one)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "span"
    name = type(model).__name__
    if "MaskedLM" in name or _mlm_parts(model) is not None:
        return "mlm"
    if "CausalLM" in name or "LMHead" in name:
        return "clm"
    return "mlm" if _lm_class(model, "mlm") or not _lm_class(model, "clm") else "clm"


def _check_objective_fits(model, objective: str) -> None:
    natural = _objective_of(model)
    if objective != natural:
        raise ValueError(f"objective={objective!r} does not fit model, a {type(model).__name__}: use "
                         f"objective={natural!r}")


def _resolve(model, objective: str, tokenizer) -> _Head:
    """The objective's head on this model; ValueError (naming model or tokenizer) where it has none."""
    name = type(model).__name__
    config = model.config
    out_emb = model.get_output_embeddings()
    _check_objective_fits(model, objective)
    if objective == "mlm":
        if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
            raise ValueError("tokenizer has no mask token, which objective='mlm' needs")
        parts = _mlm_parts(model)
        built = None
        if parts is not None:
            body = model.base_model
            own = True
        elif getattr(config, "model_type", None) == "bert" and model.base_model is model and out_emb is None:
            body = model
            built = _bert_mlm_head(model)
            parts = built.predictions.transform, built.predictions.decoder
            own = False
        else:
            cls = _lm_class(model, "mlm") or "*ForMaskedLM"
            raise ValueError(f"model, a {name}, has no masked-LM head and adapt_body builds one only for a bare "
                             f"BertModel: load {cls} (AutoModelForMaskedLM; BERT, RoBERTa or DistilBERT layouts)")
        transform, decoder = parts

        def features(batch):
            hidden = _last_hidden(body(input_ids=batch["input_ids"]))
            sel = batch["labels"] != -100
            return transform(hidden[sel]), batch["labels"][sel]
        return _Head("mlm", features, decoder.weight, decoder.bias, built=built, own_loss=own)

    if not isinstance(out_emb, nn.Linear):
        cls = _lm_class(model, objective) or ("*ForConditionalGeneration" if objective == "span" else "*ForCausalLM")
        raise ValueError(f"model, a {name}, has no vocabulary head (get_output_embeddings() is "
                         f"{type(out_emb).__name__}) and adapt_body cannot build one: load {cls} for "
                         f"objective={objective!r}")
    softcap = getattr(config, "final_logit_softcapping", None)
    if objective == "clm":
        body = model.base_model

        def features(batch):
            hidden = _last_hidden(body(input_ids=batch["input_ids"], use_cache=False))
            return hidden, F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        return _Head("clm", features, out_emb.weight, out_emb.bias, softcap=softcap)

    for attr in ("get_encoder", "get_decoder", "_shift_right"):
        if not callable(getattr(model, attr, None)):
            raise ValueError(f"model, a {name}, lacks {attr}(); objective='span' needs a T5-style "
                             "encoder-decoder (T5ForConditionalGeneration)")
    for attr in ("decoder_start_token_id", "pad_token_id"):
        if getattr(config, attr, None) is None:
            raise ValueError(f"model.config.{attr} is not set; T5's decoder inputs need it (T5 uses 0)")
    encoder, decoder = model.get_encoder(), model.get_decoder()
    scaled = getattr(config, "scale_decoder_outputs", None)
    if scaled is None:  # before transformers 5: scaled where the head is tied to the embeddings
        scaled = getattr(config, "tie_word_embeddings", True)
    scale = config.d_model ** -0.5 if scaled else None

    def features(batch):
        enc = _last_hidden(encoder(input_ids=batch["input_ids"]))
        dec = _last_hidden(decoder(input_ids=model._shift_right(batch["labels"]), encoder_hidden_states=enc,
                                   use_cache=False))
        return (dec if scale is None else dec * scale), batch["labels"]
    return _Head("span", features, out_emb.weight, out_emb.bias, softcap=softcap)


@torch.no_grad()
def _check_against_model(model, head: _Head, batch: dict) -> None:
    """The fused loss must be the model's own (model(input_ids, labels=...).loss) on a small batch, in
    eval mode: a model whose forward does more to the logits than this module knows (a logit scale, ...)
    is refused instead of trained on another objective."""
    ours, _ = head.loss(batch)
    theirs = getattr(model(input_ids=batch["input_ids"], labels=batch["labels"]), "loss", None)
    if ours is None or theirs is None:
        return
    ours, theirs = float(ours), float(theirs)
    tol = 1e-3 if head.weight.dtype == torch.float32 else 3e-2
    if not abs(ours - theirs) <= tol * max(1.0, abs(theirs)):
        raise ValueError(f"model, a {type(model).__name__}: tltorch's fused head gives loss {ours:.6g} where the "
                         f"model's own forward gives {theirs:.6g} on the same batch; its logits are computed in "
                         "a way adapt_body does not reproduce")


# ---- data ---------------------------------------------------------------------------------------------

def _text_list(name: str, texts) -> List[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{name} must be a list of strings (or a datasets.Dataset with a 'text' column), not a "
                        "single str")
    if hasattr(texts, "column_names") and not isinstance(texts, dict):  # a datasets.Dataset
        if "text" not in texts.column_names:
            raise TypeError(f"{name} is a dataset without a 'text' column (columns: {texts.column_names})")
        texts = texts["text"]
    try:
        out = list(texts)
    except TypeError:
        raise TypeError(f"{name} must be a list of strings or a datasets.Dataset, not {type(texts).__name__}") from None
    bad = next((t for t in out if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"{name} must hold strings, found a {type(bad).__name__}")
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def _stream(tokenizer, texts: List[str], objective: str) -> Tensor:
    """The texts' tokens, one after another (special tokens as the tokenizer adds them; for clm and span
    each text ends with the eos token, so the model sees where texts end)."""
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for t in ids:
        if objective != "mlm" and eos is not None and (not t or t[-1] != eos):
            t = list(t) + [eos]
        out.extend(t)
    return torch.tensor(out, dtype=torch.long)


def _blocks(stream: Tensor, length: int) -> List[Tensor]:
    """The stream cut into blocks of `length` tokens; the rest, if 2 tokens or more, as a last, shorter block."""
    n = stream.numel() // length
    out = list(stream[:n * length].view(n, length)) if n else []
    rest = stream[n * length:]
    if rest.numel() >= 2:
        out.append(rest)
    return out


def _batches(blocks: List[Tensor], batch_size: int, shuffle: bool) -> List[Tensor]:
    """Batches of equal-length blocks (no padding): the full ones, shuffled, then the shorter last one alone."""
    full = [b for b in blocks if b.numel() == blocks[0].numel()]
    rest = blocks[len(full):]
    order = torch.randperm(len(full)) if shuffle else torch.arange(len(full))
    out = [torch.stack([full[j] for j in order[i:i + batch_size]]) for i in range(0, len(full), batch_size)]
    return out + [b[None] for b in rest]


# ---- the loop -----------------------------------------------------------------------------------------

def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _check_fraction(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {v!r}")


def adapt_body(model: nn.Module, texts, tokenizer, objective: Optional[str] = None, *,
               lora: Optional[LoraConfig] = None, epochs: int = 1, lr: Optional[float] = None,
               batch_size: int = 16, max_length: int = 128, mlm_probability: float = 0.15,
               mean_noise_span_length: float = 3.0, noise_density: float = 0.15, val=None,
               weight_decay: float = 0.01, schedule: str = "onecycle", max_grad_norm: Optional[float] = 1.0,
               progress: bool = True, seed: Optional[int] = None) -> AdaptReport:
    """Specialise a pretrained transformers model's body on unlabelled text with its self-supervised
    objective, in place; returns an AdaptReport (train loss per epoch, held-out loss and perplexity
    before and after).

    model: a transformers model with its vocabulary head, trained in place: a *ForMaskedLM (BERT,
    RoBERTa or DistilBERT layouts) for "mlm", T5ForConditionalGeneration for "span", a *ForCausalLM or
    GPT2LMHeadModel for "clm". A bare BertModel (e.g. all-MiniLM-L6-v2, loaded with AutoModel) is
    accepted for "mlm": adapt_body builds BERT's masked-LM head for it (a new dense + gelu + LayerNorm
    transform, initialised as BertForMaskedLM initialises it, and the decoder tied to the body's word
    embeddings), trains it with the body and returns it as report.head; the model itself keeps no head.
    objective: "mlm", "span" or "clm"; None picks the model's own (an encoder-decoder: span; a causal
    LM, or a bare body of a type that has only a causal-LM class: clm; else mlm).

    texts: a list of strings or a datasets.Dataset with a "text" column. The texts are tokenized (with
    the tokenizer's special tokens; for clm and span each text ends with eos), concatenated and cut into
    blocks of max_length tokens, as transformers' run_mlm / run_clm and T5 do (for span, blocks whose
    corrupted inputs are max_length tokens); a last, shorter block is its own batch. No padding.
    mlm: transformers' DataCollatorForLanguageModeling(tokenizer, mlm_probability=...) masks the tokens
    (80% [MASK], 10% random, 10% kept; special tokens never) and only masked positions count. clm:
    DataCollatorForLanguageModeling(mlm=False): every next token counts (except tokens equal to the
    tokenizer's pad token, which that collator ignores). span: random_spans_noise_mask with noise_density
    and mean_noise_span_length, the tokenizer's <extra_id_k> sentinels (span_corruption).

    The loss is the model's own, computed by tltorch.functional.linear_cross_entropy on the hidden states
    (after the head's transform), never the B x T x V logits; for mlm only masked rows go through the
    transform and the head. Before training it is checked, in eval mode on one small batch, against the
    model's own forward with labels; a mismatch raises ValueError.

    lora: None trains every parameter of the model that requires grad (and a built head); a
    tltorch.LoraConfig first calls tltorch.add_lora(model, lora), so only the adapters train (a built
    head trains in full: it is new). lr: None is 5e-5 without lora, 2e-4 with. Optimiser:
    tltorch.optim.AdamW, weight_decay on matrices only (not biases or norms); schedule: fit_head's
    ("onecycle", the default, "cosine" or "constant") per step; gradients clipped to max_grad_norm
    (None: not clipped). val: None, a fraction of texts held out (at random), or held-out texts: scored
    before training and after each epoch, with the same masks or spans each time. seed: the split,
    shuffling, masks, spans, dropout and a built head's initial weights repeat exactly (torch's global
    generator left as it was); None draws them from torch's global generator.

    Bad arguments raise TypeError or ValueError naming the argument before the model is changed. An
    error during the first training step (out of memory, ...) takes back what adapt_body did (adapters,
    gradients); later, an interruption leaves the weights of the last completed step. The modules'
    train/eval modes are restored at the end.
    """
    try:
        from transformers import DataCollatorForLanguageModeling, PreTrainedModel
    except ImportError as e:
        raise ImportError(f"adapt_body needs transformers ({e}): pip install transformers") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, not {type(model).__name__}")
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, not {type(tokenizer).__name__}")
    if objective is None:
        objective = _objective_of(model)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(map(repr, OBJECTIVES))} or None, got {objective!r}")
    _check_objective_fits(model, objective)  # first: the other checks assume the objective
    if lora is not None and not isinstance(lora, LoraConfig):
        raise TypeError(f"lora must be a tltorch.LoraConfig or None, not {type(lora).__name__}")
    _check_int("epochs", epochs, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("max_length", max_length, 3 if objective == "span" else 2)
    if lr is None:
        lr = 5e-5 if lora is None else 2e-4
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_fraction("mlm_probability", mlm_probability)
    _check_fraction("noise_density", noise_density)
    if isinstance(mean_noise_span_length, bool) or not isinstance(mean_noise_span_length, (int, float)) \
            or not 1.0 <= mean_noise_span_length < math.inf:
        raise ValueError(f"mean_noise_span_length must be a number >= 1, got {mean_noise_span_length!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    texts = _text_list("texts", texts)
    val_fraction = isinstance(val, (int, float)) and not isinstance(val, bool)
    if val_fraction:
        _check_fraction("val", val)
    val_texts = _text_list("val", val) if val is not None and not val_fraction else None
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    pad_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    if limit is not None and pad_idx is not None:  # RoBERTa's positions start after its padding index
        limit -= pad_idx + 1
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the model's {limit} positions")

    device = next(model.parameters()).device
    fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None)
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        if val_fraction:
            n_val = min(max(int(round(len(texts) * val)), 1), len(texts) - 1)
            if n_val < 1:
                raise ValueError(f"val={val} leaves no text to train on ({len(texts)} texts)")
            perm = torch.randperm(len(texts)).tolist()
            val_texts = [texts[i] for i in perm[:n_val]]
            texts = [texts[i] for i in perm[n_val:]]
        head = _resolve(model, objective, tokenizer)
        vocab = head.weight.shape[0]
        sentinels = eos_id = None
        if objective == "span":
            block_len = _raw_length(max_length, noise_density, mean_noise_span_length)
            need = _span_counts(block_len, noise_density, mean_noise_span_length)[1]
            ids = [tokenizer.convert_tokens_to_ids(f"<extra_id_{k}>") for k in range(need)]
            if any(i is None or i == tokenizer.unk_token_id for i in ids):
                raise ValueError(f"tokenizer lacks the sentinel tokens <extra_id_0> ... <extra_id_{need - 1}> that "
                                 f"span corruption of {block_len}-token blocks needs")
            sentinels = torch.tensor(ids)
            eos_id = tokenizer.eos_token_id
            if eos_id is None:
                raise ValueError("tokenizer has no eos token, which objective='span' ends inputs and targets with")
            special = ids + [eos_id]
        else:
            block_len = max_length
            special = [tokenizer.mask_token_id] if objective == "mlm" else []
        streams = {"texts": _stream(tokenizer, texts, objective)}
        if val_texts is not None:
            streams["val"] = _stream(tokenizer, val_texts, objective)
        for name, s in streams.items():
            if s.numel() < 2:
                raise ValueError(f"{name}: the tokenizer makes {s.numel()} token(s) of it; at least 2 are needed")
        top = max([int(s.max()) for s in streams.values()] + special)
        if objective == "mlm":
            top = max(top, len(tokenizer) - 1)  # the collator draws random replacements below len(tokenizer)
        if top >= vocab:
            raise ValueError(f"tokenizer produces token id {top} but the model's vocabulary has {vocab} rows: "
                             "not the model's tokenizer")
        collator = None if objective == "span" else DataCollatorForLanguageModeling(
            tokenizer, mlm=objective == "mlm", mlm_probability=float(mlm_probability))

        def make(block_batch: Tensor) -> dict:
            if objective == "span":
                inputs, labels = span_corruption(block_batch, sentinels, eos_id, noise_density,
                                                 mean_noise_span_length)
                batch = {"input_ids": inputs, "labels": labels}
            else:
                batch = dict(collator([b.tolist() for b in block_batch]))
            return {k: v.to(device) for k, v in batch.items()}

        train_blocks = _blocks(streams["texts"], block_len)
        val_blocks = _blocks(streams["val"], block_len) if val_texts is not None else []
        if objective == "span":  # a last, shorter block's span counts must fit too
            for b in train_blocks[-1:] + val_blocks[-1:]:
                _span_counts(b.numel(), noise_density, mean_noise_span_length)
        val_batches = [make(b) for b in _batches(val_blocks, batch_size, False)]
        check = make(train_blocks[0][None, :_CHECK_TOKENS])
        modules = list(model.modules()) + (list(head.built.modules()) if head.built is not None else [])
        modes = {m: m.training for m in modules}
        try:
            for m in modules:
                m.training = False
            if head.own_loss:
                _check_against_model(model, head, check)
            before = _evaluate(head, val_batches)
        finally:
            for m, t in modes.items():
                m.training = t
        report = AdaptReport(objective=objective, train_loss=[], val_loss=[], lr=[], time=[], tokens=[],
                             val_loss_before=before, val_loss_after=None,
                             val_perplexity_before=_ppl(before), val_perplexity_after=None, steps=0,
                             trainable=0, head=head.built)
        _train(model, head, lora, train_blocks, make, val_batches, report, modes, epochs=epochs, lr=float(lr),
               batch_size=batch_size, weight_decay=float(weight_decay), schedule=schedule,
               max_grad_norm=max_grad_norm, progress=progress)
    return report


def _ppl(loss):
    return None if loss is None else math.exp(min(loss, 700.0))


@torch.no_grad()
def _evaluate(head: _Head, batches: Sequence[dict]) -> Optional[float]:
    """Mean loss per target token over batches (None without any)."""
    total, count = 0.0, 0
    for b in batches:
        loss, n = head.loss(b, reduction="sum")
        if n:
            total += float(loss)
            count += n
    return total / count if count else None


def _train(model, head: _Head, lora, blocks, make: Callable, val_batches, report: AdaptReport, modes, *, epochs,
           lr, batch_size, weight_decay, schedule, max_grad_norm, progress) -> None:
    grads = {p: p.grad for p in model.parameters()}
    flags = {p: p.requires_grad for p in model.parameters()}
    lora_added = stepped = False
    bar = None
    try:
        if lora is not None:
            add_lora(model, lora)
            lora_added = True
        params = list({id(p): p for p in list(model.parameters()) + (
            list(head.built.parameters()) if head.built is not None else []) if p.requires_grad}.values())
        if not params:
            raise ValueError("model has no parameter that requires grad: unfreeze it or pass lora=")
        report["trainable"] = sum(p.numel() for p in params)
        opt = AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                     {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr)
        n_batches = len(_batches(blocks, batch_size, False))
        total = epochs * n_batches
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc=f"adapt_body ({head.objective})", unit="step")
        t0 = time.perf_counter()
        step = 0
        for _ in range(epochs):
            model.train()
            if head.built is not None:
                head.built.train()
            loss_sum, tokens = 0.0, 0
            for block_batch in _batches(blocks, batch_size, True):
                batch = make(block_batch)
                step_lr = lr * _lr_factor(schedule, step, total)
                step += 1
                loss, n = head.loss(batch)
                if bar is not None:
                    bar.update(1)
                if n == 0:  # nothing masked in a short batch
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                for g in opt.param_groups:
                    g["lr"] = step_lr
                opt.step()
                stepped = True
                report["steps"] += 1
                loss_sum += loss.item() * n
                tokens += n
                if bar is not None:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            report["train_loss"].append(loss_sum / tokens if tokens else float("nan"))
            report["tokens"].append(tokens)
            report["lr"].append(step_lr)
            if val_batches:
                model.eval()
                if head.built is not None:
                    head.built.eval()
                report["val_loss"].append(_evaluate(head, val_batches))
                report["val_loss_after"] = report["val_loss"][-1]
                report["val_perplexity_after"] = _ppl(report["val_loss_after"])
            report["time"].append(time.perf_counter() - t0)
    except BaseException:
        if not stepped:  # nothing trained yet: the model goes back to what it was
            if lora_added:
                _remove_layers(model)
            for p, f in flags.items():
                p.requires_grad_(f)
        raise
    finally:
        if bar is not None:
            bar.close()
        # .grad as it was: the model's parameters' as before, none on adapters or a built head
        for p in list(model.parameters()) + (list(head.built.parameters()) if head.built is not None else []):
            p.grad = grads.get(p)
        for m, t in modes.items():
            m.training = t
