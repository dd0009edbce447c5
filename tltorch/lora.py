"""LoRA on an existing model, PEFT-compatible: LoraConfig, add_lora, disable_lora, merge_lora,
save_adapter / load_adapter (PEFT's adapter_config.json + adapter_model.safetensors), trainable_parameters.

The model stays the user's own object: targeted layers become tltorch.nn.LoRALinear in place and
everything else is frozen. Unlike PEFT, modules_to_save are trained in place (no copy of the original
is kept), so disable_lora turns off the low-rank updates only.
"""
import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ._io import atomic_write
from ._pattern import first_match, pattern_key
from .nn.lora import INITS, LoRALinear, check_alpha, check_lora_args, check_rank, is_conv1d, is_lora_base

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_BIAS = ("none", "all", "lora_only")
_ATTR = "_tltorch_lora_config"

# PEFT's defaults when target_modules is None, for the model families most often fine-tuned.
_DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
    "bloom": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}
# PEFT's task types, and the modules each one trains in full and saves with the adapter (its
# PeftModelForSequenceClassification, ...ForTokenClassification, ...ForQuestionAnswering add them to
# modules_to_save; those present in the model are used).
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                 "QUESTION_ANS": ("qa_outputs",)}
# adapter_model.safetensors metadata: the digest of the config fields that the weights alone do not
# determine, recorded by save_adapter so that load_adapter can tell a weights file from its config's.
_DIGEST_KEY = "tltorch_config_sha256"
_DIGEST_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "bias")
# PEFT options whose adapters compute something LoRALinear does not: refused when a file sets them.
_UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters",
                "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config")


@dataclass
class LoraConfig:
    """Where and how to add LoRA adapters; field names and meanings are PEFT's.

    target_modules: a list of names (each matches a module path or a dot-separated suffix of it), a
    string (a regular expression that must match the whole path), "all-linear" (every Linear and
    transformers Conv1D except the output head), or None (PEFT's default for the model's
    config.model_type). modules_to_save: names (matched like target_modules) of modules trained in
    full and saved with the adapter, e.g. a new classifier. bias: which biases train: "none", "all",
    or "lora_only" (those of the adapted layers). task_type: one of PEFT's task types; as in PEFT,
    "SEQ_CLS" and "TOKEN_CLS" also train and save the model's "classifier" or "score" module, and
    "QUESTION_ANS" its "qa_outputs" (added to modules_to_save, so they get no LoRA adapter).
    rank_pattern / alpha_pattern: {key: r} / {key: lora_alpha} for the layers whose path a key
    matches as PEFT matches it (the first key for which re.match(rf"(.*\\.)?({key})$", path)
    succeeds), in time linear in the path; keys with backreferences, lookarounds, atomic groups or
    IGNORECASE are refused. init_lora_weights: True, False, "gaussian" or "orthogonal" (r even).
    """
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[List[str], str]] = None
    use_rslora: bool = False
    modules_to_save: Optional[List[str]] = None
    bias: str = "none"
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    task_type: Optional[str] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        check_lora_args(self.r, self.lora_alpha, self.lora_dropout, self.init_lora_weights)
        self.rank_pattern = _patterns("rank_pattern", self.rank_pattern, check_rank)
        self.alpha_pattern = _patterns("alpha_pattern", self.alpha_pattern, check_alpha)
        self.target_modules = _name_list("target_modules", self.target_modules, regex_ok=True)
        self.modules_to_save = _name_list("modules_to_save", self.modules_to_save, regex_ok=False)
        if self.bias not in _BIAS:
            raise ValueError(f"bias must be one of {', '.join(map(repr, _BIAS))}, got {self.bias!r}")
        for name in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, not {type(getattr(self, name)).__name__}")
        if self.task_type is not None and not isinstance(self.task_type, str):
            raise TypeError(f"task_type must be a str or None, not {type(self.task_type).__name__}")
        if self.task_type is not None and self.task_type not in _TASK_TYPES:
            raise ValueError(f"task_type must be one of {', '.join(_TASK_TYPES)} or None, got {self.task_type!r}")

    def to_dict(self) -> dict:
        """The adapter_config.json PEFT writes for this configuration (its core LoRA fields)."""
        return {
            "peft_type": "LORA", "task_type": self.task_type, "auto_mapping": None,
            "base_model_name_or_path": None, "revision": None, "inference_mode": True,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules, "use_rslora": self.use_rslora,
            "modules_to_save": self.modules_to_save, "bias": self.bias,
            "init_lora_weights": self.init_lora_weights, "fan_in_fan_out": self.fan_in_fan_out,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern), "use_dora": False,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        """A LoraConfig from a PEFT adapter_config.json dict; ValueError for other PEFT methods and for
        LoRA variants that compute something else (DoRA, ...)."""
        if d.get("peft_type") != "LORA":
            raise ValueError(f"peft_type is {d.get('peft_type')!r}; only 'LORA' adapters can be loaded")
        for key in _UNSUPPORTED:
            if d.get(key):
                raise ValueError(f"{key}={d[key]!r} is not supported (plain LoRA only)")
        init = d.get("init_lora_weights", True)
        if not (isinstance(init, bool) or init in INITS):
            raise ValueError(f"init_lora_weights={init!r}: such adapters need the base weights PEFT changed at "
                             f"initialisation; only True, False, {' and '.join(map(repr, INITS))} are supported")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        for name in ("rank_pattern", "alpha_pattern"):
            if kw.get(name, {}) is None:  # written as null by some versions: no pattern
                kw[name] = {}
        return cls(**kw)

    def layer_args(self, path: str) -> Tuple[int, float]:
        """(r, lora_alpha) of the layer at path: rank_pattern / alpha_pattern's value for it, or r / lora_alpha."""
        r, alpha = first_match(self.rank_pattern, path), first_match(self.alpha_pattern, path)
        return (self.r if r is None else self.rank_pattern[r],
                self.lora_alpha if alpha is None else self.alpha_pattern[alpha])


def _patterns(what: str, v, check) -> dict:
    """A copy of a rank_pattern / alpha_pattern dict, each key compiled and each value checked."""
    if not isinstance(v, dict):
        raise TypeError(f"{what} must be a dict of {{key: value}}, not {type(v).__name__}")
    for key, value in v.items():
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be str, not {type(key).__name__}")
        try:
            pattern_key(key)
        except ValueError as e:
            raise ValueError(f"{what} key {key!r}: {e}") from None
        check(f"{what}[{key!r}]", value)
    return dict(v)


def _name_list(what: str, v, regex_ok: bool):
    if v is None:
        return None
    if isinstance(v, str):
        if regex_ok:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{what} {v!r} is not a valid regular expression: {e}") from None
            return v
        return [v]
    if isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in v):
        out = sorted(v) if isinstance(v, (set, frozenset)) else list(v)
        if not out:
            raise ValueError(f"{what} is empty")
        return out
    raise TypeError(f"{what} must be a list of module names{' or a regex string' if regex_ok else ''}, "
                    f"not {type(v).__name__}")


# ---- finding modules ---------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model under torch.compile's OptimizedModule and (Distributed)DataParallel."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _name_matches(name: str, names: List[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in names)


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _modules_to_save(model: nn.Module, config: LoraConfig, strict: bool) -> List[str]:
    """Paths of the modules named in modules_to_save or by the task type (outermost ones only).
    strict: ValueError for a modules_to_save name that matches nothing, and for a task type whose
    modules the model lacks when modules_to_save is empty (nothing would train the task's head)."""
    named = list(config.modules_to_save or [])
    task = _TASK_MODULES.get(config.task_type, ())
    names = named + [t for t in task if t not in named]
    paths = []
    for name, _ in model.named_modules():
        if name and _name_matches(name, names) and not _within(name, paths):
            paths.append(name)
    if strict:
        for t in named:
            if not any(_name_matches(p, [t]) for p in paths):
                raise ValueError(f"modules_to_save: no module of the model is named {t!r}")
        if task and not named and not paths:
            raise ValueError(f"task_type={config.task_type!r} trains the model's {' or '.join(map(repr, task))} "
                             "module, as PEFT does, but the model has none; name the module to train in "
                             "modules_to_save")
    return paths


def _saved_names(model: nn.Module, config: LoraConfig) -> Optional[List[str]]:
    """modules_to_save as written to adapter_config.json: the config's names and those of the task's
    modules the model has (as PEFT writes them), so that any reader trains and loads the same modules."""
    paths = _modules_to_save(model, config, strict=False)
    names = list(config.modules_to_save or [])
    names += [t for t in _TASK_MODULES.get(config.task_type, ())
              if t not in names and any(_name_matches(p, [t]) for p in paths)]
    return names or None


def _output_heads(model: nn.Module, config: LoraConfig) -> set:
    """The modules "all-linear" leaves alone: PEFT's rule (output embeddings, or the classifier of a
    SEQ_CLS model)."""
    head = None
    if callable(getattr(model, "get_output_embeddings", None)):
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
    if head is None and config.task_type == "SEQ_CLS":
        head = next((m for m in (getattr(model, "score", None), getattr(model, "classifier", None))
                     if m is not None), None)
    return {id(head)} if isinstance(head, nn.Module) else set()


def _targets(model: nn.Module, config: LoraConfig, mts: List[str]) -> List[str]:
    """Paths of the layers config.target_modules selects (an existing LoRALinear counts as its layer)."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in _DEFAULT_TARGETS:
            raise ValueError("target_modules is None and there is no default for this model "
                             f"(model_type {model_type!r}); pass target_modules, e.g. ['q_proj', 'v_proj'] "
                             "or 'all-linear'")
        targets = _DEFAULT_TARGETS[model_type]
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    heads = _output_heads(model, config) if all_linear else set()
    found, inside = [], []
    for name, m in model.named_modules(remove_duplicate=False):
        if not name or _within(name, inside) or _within(name, mts):
            continue
        linear = isinstance(m, LoRALinear) or is_lora_base(m)
        if isinstance(m, LoRALinear):
            inside.append(name)
        if all_linear:
            hit = linear and id(m) not in heads
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = _name_matches(name, targets)
        if hit:
            if not linear:
                raise ValueError(f"target_modules selects {name!r}, a {type(m).__name__}; only torch.nn.Linear "
                                 "transformers Conv1D and tltorch FrozenLinear layers can take a LoRA adapter")
            found.append(name)
    return found


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


class _AdapterSaver:
    """model.save_pretrained on a transformers model with tltorch adapters: writes the adapter (PEFT's
    two files, what a PeftModel's save_pretrained writes), so that Trainer.save_model saves what
    load_adapter and PeftModel.from_pretrained load. The class's own save_pretrained would write the
    whole model under tltorch's names (query.base.weight), which from_pretrained of the model's class
    does not load: it re-initialises those weights with only a log message."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *, state_dict: Optional[dict] = None, is_main_process: bool = True,
                 push_to_hub: bool = False, **kwargs) -> None:
        if push_to_hub:
            raise ValueError("push_to_hub: this model saves its LoRA adapter; upload the folder save_pretrained "
                             "writes, or tltorch.merge_lora(model, unload=True) first to save the whole model")
        if is_main_process:
            _save_adapter(self.model, save_directory, state_dict)


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Undo adding adapters to a model without them when the body raises: its layers, requires_grad
    flags and the attributes add_lora sets go back to what they were."""
    grads = {p: p.requires_grad for p in model.parameters()}
    attrs = {k: model.__dict__[k] for k in (_ATTR, "save_pretrained") if k in model.__dict__}
    try:
        yield
    except BaseException:
        _remove_layers(model)
        model.__dict__.update(attrs)
        for p, g in grads.items():
            p.requires_grad_(g)
        raise


def _inject(model: nn.Module, config: LoraConfig, ranks: Dict[str, Tuple[int, float]], mts: List[str]) -> None:
    """Replace each layer at ranks' paths by a LoRALinear of rank r and alpha, then freeze the rest.
    Every layer's arguments are checked before the model is changed."""
    for path, (r, alpha) in ranks.items():
        try:
            check_lora_args(r, alpha, config.lora_dropout, config.init_lora_weights)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {path!r}: {e}") from None
    made = {}
    for path, (r, alpha) in ranks.items():
        base = model.get_submodule(path)
        if id(base) not in made:  # a layer shared between paths gets one adapter
            made[id(base)] = LoRALinear(base, r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                                        use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
            # in the mode of the layer it wraps: a model in eval mode gets adapters without dropout
            made[id(base)].train(base.training)
        _set_module(model, path, made[id(base)])
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in made.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        if config.bias == "lora_only" and layer.base.bias is not None:
            layer.base.bias.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                p.requires_grad_(True)
    for path in mts:
        model.get_submodule(path).requires_grad_(True)
    setattr(model, _ATTR, config)
    if _is_transformers_model(model):
        model.save_pretrained = _AdapterSaver(model)


def add_lora(model: nn.Module, config: Optional[LoraConfig] = None) -> nn.Module:
    """Put LoRA adapters on the layers config.target_modules selects and freeze everything else
    (except modules_to_save and the biases config.bias names). Changes model in place and returns it.

    Each selected nn.Linear (or transformers Conv1D) becomes a tltorch.nn.LoRALinear wrapping it. On
    a transformers model, save_pretrained (and so Trainer.save_model) then writes the adapter, as a
    PeftModel's does; merge_lora(model, unload=True) gives the class's own back. Each adapter starts in
    the mode of the layer it wraps (after model.eval(), without dropout, as PeftModel.from_pretrained's).
    ValueError when nothing matches or the model already has adapters; the model is then unchanged."""
    config = LoraConfig() if config is None else config
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a tltorch.LoraConfig, not {type(config).__name__}")
    root = model
    model = _unwrap(model)
    if _lora_layers(model):
        raise ValueError("the model already has LoRA adapters (one adapter per model); call "
                         "tltorch.merge_lora(model, unload=True) first to start a new one")
    mts = _modules_to_save(model, config, strict=True)
    paths = _targets(model, config, mts)
    if not paths:
        linears = [n for n, m in model.named_modules() if n and is_lora_base(m)]
        hint = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
        raise ValueError(f"target_modules={config.target_modules!r} matches no Linear layer of the model "
                         f"(its Linear layers: {hint or 'none'})")
    with _all_or_nothing(model):
        _inject(model, config, {p: config.layer_args(p) for p in paths}, mts)
    return root


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """``with disable_lora(model):`` the model computes without its LoRA updates (merged ones are taken
    out for the duration); the adapters' state is restored on exit, exceptions included."""
    layers = list(_lora_layers(_unwrap(model)).values())
    state = [(m, m.disabled, m.merged) for m in layers]
    try:
        for m in layers:
            m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m, disabled, merged in state:
            m.disabled = disabled
            if merged:
                m.merge()


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold every adapter into its base layer's weight. With unload=True, also replace each LoRALinear
    by its (merged) base layer and return a plain torch model with no tltorch module left."""
    root = model
    model = _unwrap(model)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    for m in layers.values():
        m.merge()
    if not unload:
        return root
    if isinstance(model, LoRALinear):
        return model.base
    _remove_layers(model)
    return root


def _remove_layers(model: nn.Module) -> None:
    """Put each LoRALinear's base layer back in its place; drop what add_lora set on the model."""
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if name and isinstance(m, LoRALinear):
            _set_module(model, name, m.base)
    model.__dict__.pop(_ATTR, None)
    if isinstance(model.__dict__.get("save_pretrained"), _AdapterSaver):
        del model.__dict__["save_pretrained"]


def trainable_parameters(model: nn.Module, print_summary: bool = False) -> Tuple[int, int]:
    """(trainable, total) parameter counts; print_summary prints them on one line like PEFT's
    print_trainable_parameters."""
    trainable = total = 0
    for p in _unwrap(model).parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    if print_summary:
        pct = 100.0 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}")
    return trainable, total


# ---- PEFT's files ------------------------------------------------------------------------------------

def _model_config(model: nn.Module) -> LoraConfig:
    """The config add_lora (or load_adapter) recorded; for hand-built LoRALinear layers, one read off them."""
    cfg = getattr(model, _ATTR, None)
    if isinstance(cfg, LoraConfig):
        return cfg
    layers = _lora_layers(model)
    first = next(iter(layers.values()))
    return LoraConfig(r=first.r, lora_alpha=first.lora_alpha, lora_dropout=first.lora_dropout,
                      use_rslora=first.use_rslora, target_modules=sorted(layers))


def _adapter_keys(model: nn.Module, config: LoraConfig, layers: Dict[str, LoRALinear]) -> Dict[str, str]:
    """{key in PEFT's file: key in model.state_dict()} for everything an adapter file holds: lora_A/B
    of each adapted layer, the biases config.bias trains, and the modules_to_save weights."""
    def peft_key(model_key):
        # A LoRALinear's base is PEFT's base_layer; its lora_A parameter is PEFT's lora_A (a Linear).
        module, _, leaf = model_key.rpartition(".")
        if module in layers:
            return f"{_PREFIX}{module}.{leaf}.weight"
        owner, _, sub = module.rpartition(".")
        if sub == "base" and owner in layers:
            return f"{_PREFIX}{owner}.base_layer.{leaf}"
        return _PREFIX + model_key

    state = model.state_dict(keep_vars=True)
    keys = [f"{n}.{leaf}" for n in layers for leaf in ("lora_A", "lora_B")]
    if config.bias == "lora_only":
        keys += [f"{n}.base.bias" for n, m in layers.items() if m.base.bias is not None]
    elif config.bias == "all":
        keys += [k for k in state if k.rpartition(".")[2] == "bias"]
    for path in _modules_to_save(model, config, strict=False):
        keys += [k for k in state if k.startswith(path + ".")]
    return {peft_key(k): k for k in dict.fromkeys(keys)}


def _config_digest(d: dict) -> str:
    return hashlib.sha256(json.dumps({k: d.get(k) for k in _DIGEST_FIELDS}, sort_keys=True).encode()).hexdigest()


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write the model's adapter to folder `path` in PEFT's format (adapter_config.json and
    adapter_model.safetensors), so that peft.PeftModel.from_pretrained(base_model, path) loads it.

    Each file is written to a temporary file in the folder and renamed into place, the weights
    first. The weights file's metadata records a digest of the config's r, lora_alpha, rank/alpha
    patterns, use_rslora, lora_dropout and bias: a save interrupted between the two renames leaves
    new weights beside an old config, which load_adapter then refuses instead of loading with the
    old scaling."""
    _save_adapter(model, path)


def _save_adapter(model: nn.Module, path, state_dict: Optional[dict] = None) -> None:
    """save_adapter; state_dict: the model's state_dict to take the tensors from (what a trainer that
    shards parameters gathers), else the model's own."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save (call tltorch.add_lora first)")
    config = _model_config(model)
    if len({m.use_rslora for m in layers.values()}) > 1:
        raise ValueError("the adapters mix use_rslora=True and False; PEFT's format has one setting")
    d = config.to_dict()
    d["use_rslora"] = next(iter(layers.values())).use_rslora
    # Each layer's own rank and alpha, where they differ from the config's, as PEFT's per-layer
    # patterns (regexes anchored at a path suffix, so an escaped full path names exactly one layer).
    d["rank_pattern"] = {re.escape(n): m.r for n, m in layers.items() if m.r != config.r}
    d["alpha_pattern"] = {re.escape(n): m.lora_alpha for n, m in layers.items() if m.lora_alpha != config.lora_alpha}
    d["modules_to_save"] = _saved_names(model, config)
    targets = config.target_modules
    try:
        same = set(_targets(model, config, _modules_to_save(model, config, strict=False))) == set(layers)
    except ValueError:
        same = False
    if not same or targets is None or (isinstance(targets, str) and targets.lower() == "all-linear"):
        # Spell out the layers' paths: PEFT resolves them to exactly these layers on any model.
        d["target_modules"] = sorted(layers)
    d["fan_in_fan_out"] = config.fan_in_fan_out or any(m.is_conv1d for m in layers.values())
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    d["base_model_name_or_path"] = name or None

    state = model.state_dict(keep_vars=True) if state_dict is None else state_dict
    keys = _adapter_keys(model, config, layers)
    absent = [mk for mk in keys.values() if mk not in state]
    if absent:
        raise ValueError(f"state_dict lacks {len(absent)} of the adapter's tensors, e.g. {absent[0]!r}")
    tensors = {fk: state[mk].detach().to("cpu", copy=True).contiguous() for fk, mk in keys.items()}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    text = json.dumps(d, indent=2, sort_keys=True) + "\n"
    meta = {"format": "pt", _DIGEST_KEY: _config_digest(d)}

    # 0644: safetensors may leave 0600, unreadable to the other users of a shared model folder
    atomic_write(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata=meta), mode=0o644)
    atomic_write(os.path.join(path, CONFIG_NAME), text.encode("utf-8"), mode=0o644)


def _read_adapter(path: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter folder {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    w_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path!r} is missing: not a PEFT adapter folder")
    if not os.path.isfile(w_path):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise FileNotFoundError(f"{w_path!r} is missing" + (
            " (only adapter_model.bin, a pickle, is there: tltorch reads safetensors only; resave it with "
            "PEFT's save_pretrained(..., safe_serialization=True))" if pickled else ""))
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{cfg_path!r} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path!r} does not hold a JSON object")
    try:
        config = LoraConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path!r}: {e}") from None
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(w_path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{w_path!r} is not a readable safetensors file: {e}") from None
    if _DIGEST_KEY in meta and meta[_DIGEST_KEY] != _config_digest(d):
        raise ValueError(f"{cfg_path!r} is not the configuration {w_path!r} was saved with (its r, lora_alpha, "
                         "rank/alpha patterns, use_rslora, lora_dropout or bias differ; a save interrupted "
                         "between the two files leaves this): save the adapter again")
    bad = [k for k in tensors if not k.startswith(_PREFIX)]
    if bad:
        raise ValueError(f"{w_path!r}: key {bad[0]!r} does not start with {_PREFIX!r}; not a PEFT adapter")
    # PEFT writes modules_to_save twice when bias="all" (as <m>.bias and <m>.modules_to_save.bias) and
    # the untrained original too (<m>.original_module.bias): keep the one trained copy.
    for k in list(tensors):
        if ".original_module." in k:
            del tensors[k]
        elif ".modules_to_save." in k:
            plain = k.replace(".modules_to_save.", ".", 1)
            tensors.setdefault(plain, tensors[k])
            del tensors[k]
    return config, tensors


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load an adapter saved by save_adapter or by PEFT's save_pretrained into model; returns model.

    A model without adapters first gets them, on the layers the file has weights for, with the file's
    rank, alpha (alpha_pattern included), dropout, bias and modules_to_save settings; a model with
    adapters must match the file (same layers and shapes) and takes its weights and scaling.
    ValueError/FileNotFoundError for a bad or mismatched file, and the model is then left exactly as
    it was. Tensors of another floating dtype are cast to the model's, as PEFT does; integer, bool
    and complex tensors are refused (they are no adapter's weights)."""
    root = model
    model = _unwrap(model)
    path = os.fspath(path)
    config, tensors = _read_adapter(path)
    w_path = os.path.join(path, WEIGHTS_NAME)
    layers = _lora_layers(model)
    if not layers:
        ranks = {}
        for k, t in tensors.items():
            if k.endswith(".lora_A.weight"):
                p = k[len(_PREFIX):-len(".lora_A.weight")]
                try:
                    m = model.get_submodule(p)
                except AttributeError:
                    raise ValueError(f"{w_path!r} has an adapter for {p!r}, which the model does not have") from None
                if not is_lora_base(m):
                    raise ValueError(f"{w_path!r} has an adapter for {p!r}, a {type(m).__name__}, not a Linear")
                if t.dim() != 2 or t.shape[0] < 1:
                    raise ValueError(f"{w_path!r}: {k!r} has shape {tuple(t.shape)}, not (r, in_features)")
                ranks[p] = (t.shape[0], config.layer_args(p)[1])
        if not ranks:
            raise ValueError(f"{w_path!r} holds no LoRA weights (no '*.lora_A.weight' key)")
        with _all_or_nothing(model):
            _inject(model, config, ranks, _modules_to_save(model, config, strict=False))
            _copy_adapter(model, config, tensors, w_path)
        return root
    merged = [n for n, m in layers.items() if m.merged]
    if merged:
        raise ValueError(f"{merged[0]!r} is merged; unmerge the adapters before loading new weights")
    alphas = {n: config.layer_args(n)[1] for n in layers}
    _copy_adapter(model, config, tensors, w_path)
    for n, m in layers.items():
        m.set_scaling(alphas[n], config.use_rslora)
    return root


def _copy_adapter(model: nn.Module, config: LoraConfig, tensors: dict, w_path: str) -> None:
    """Check that tensors are exactly the model's adapter weights (keys, shapes, dtypes), then copy
    them in, all or none."""
    expected = _adapter_keys(model, config, _lora_layers(model))
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{w_path!r} lacks {len(missing)} weight(s) the model's adapter needs, e.g. {missing[0]!r}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(f"{w_path!r} has {len(unexpected)} weight(s) that match nothing in the model's adapter, "
                         f"e.g. {unexpected[0]!r}")
    state = model.state_dict(keep_vars=True)
    for fk, mk in expected.items():
        src, dst = tensors[fk], state[mk]
        if src.shape != dst.shape:
            raise ValueError(f"{w_path!r}: {fk!r} has shape {tuple(src.shape)} but the model's "
                             f"{mk!r} has {tuple(dst.shape)}")
        # Floating dtypes convert (float64/16/bfloat16 weights into float32 layers); nothing else is
        # an adapter's weight, and an integer buffer (of a module saved whole) only takes its own dtype.
        if src.dtype != dst.dtype and not (src.is_floating_point() and dst.is_floating_point()):
            raise ValueError(f"{w_path!r}: {fk!r} is {src.dtype}, which cannot be loaded into the model's "
                             f"{mk!r} ({dst.dtype}): adapter weights are floating point")
    with torch.no_grad():
        old = {mk: state[mk].detach().clone() for mk in expected.values()}
        try:
            for fk, mk in expected.items():
                state[mk].copy_(tensors[fk])
        except BaseException:
            for mk, t in old.items():
                state[mk].copy_(t)
            raise
