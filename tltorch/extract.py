"""extract_features: run a frozen body over a dataset once and keep one feature vector per example,
optionally in a resumable, validated cache on disk.

The cache's files and the checks made on them are in tltorch/cache.py.
"""
import contextlib
import hashlib
import inspect
import os
import secrets
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from . import functional
from ._heap import reuse_memory
from .cache import FORMAT, CacheError, StaleCacheWarning, _dtype_name, _hash_body, _hash_inputs, _Store

__all__ = ["extract_features", "CacheError", "StaleCacheWarning"]

_POOLINGS = ("cls", "mean", "max")
_LABEL_KEYS = ("labels", "label")


def extract_features(body: nn.Module, data, *, batch_size: int = 64, pooling: Optional[str] = None,
                     device=None, dtype: Optional[torch.dtype] = None,
                     compute_dtype: Optional[torch.dtype] = None,
                     cache: Union[str, os.PathLike, None] = None, progress: bool = True):
    """Features of every example in `data`: an (N, D) tensor on the CPU, or (features, labels) when the
    data carries labels.

    body: any nn.Module. It runs in eval mode under torch.inference_mode(); every submodule's training
    flag is restored afterwards. Its output may be a tensor, a tuple (its first element is used) or
    anything with a `last_hidden_state` attribute or key (transformers models). A (B, D) output is used
    as is; a (B, T, D) one needs `pooling`.

    data, read once, in order:
      - a torch Dataset (map-style or iterable): batched by a DataLoader of `batch_size`, default collate;
      - a DataLoader, or any other iterable: each element is one batch, as a DataLoader yields it;
      - a tensor, or a dict of tensors (a tokenizer's output for the whole set): split into batches of
        `batch_size` rows.
    A batch is a tensor (passed to body as its one argument), a dict (tokenizer output: passed as keyword
    arguments, keeping those body's forward accepts; a body that accepts none of them, nn.Sequential say,
    gets input_ids, or the dict's first value; its "labels"/"label" entry is the label, not an input) or
    an (input, label) pair of those. Labels are returned concatenated in order. Wrap a 🤗 datasets
    Dataset in a DataLoader (it is not a torch Dataset; iterating it yields examples, not batches).

    pooling: None, "cls", "mean" or "max": one vector per sequence from (B, T, D) hidden states by the
    tltorch.functional.pool kernel, counting only the tokens the batch's attention_mask marks ("cls": the
    first token).
    device: where body runs and the inputs are moved (default: the device of body's first parameter or
    buffer, else the CPU). The features are returned on the CPU.
    dtype: the dtype of the returned (and cached) features, e.g. torch.float16 to halve a cache; default
    the body's output dtype.
    compute_dtype: torch.bfloat16 or torch.float16: run body under torch.autocast(device type,
    compute_dtype), which runs linear layers, matmuls and attention in that dtype and keeps the rest
    (LayerNorm, the residual stream) in float32; body's output is taken in float32 (pooled, and returned
    unless dtype says otherwise). A body frozen with
    tltorch.freeze(storage="bfloat16") under bfloat16 autocast reads its stored weights as they are (no
    cast per batch). On a CPU with AVX512-BF16 and AMX, README's "Which storage" gives the speeds and
    the features' cosine to float32's (benchmarks/bench_body.py). None (the default): as body is.
    On the CPU every run reuses the memory each batch frees (tltorch.reuse_memory).
    progress: show a tqdm progress bar in rows per second (renders in notebooks too).

    cache: a directory. Features are written there in chunks as they are computed (each to a temporary
    file, fsynced, renamed into place, and only then recorded in the manifest, itself replaced
    atomically), so a run interrupted in any way (an exception, Ctrl-C, the process killed) resumes
    from the last recorded chunk and never reads a partial one; an exception also writes out the
    batches finished before it. The manifest records what made the features:
      - the body: a blake2b hash of its class and repr (the module tree and its settings) and of every
        parameter and buffer: name, dtype, shape and all bytes. Hashing all bytes is cheap next to a
        forward pass over a dataset (~1 GB/s) and, unlike a sample of the weights, cannot miss a
        fine-tuned layer. The code of forward itself is not part of it.
      - the data: a blake2b hash of each batch's inputs (every tensor's name, dtype, shape and bytes;
        labels excluded: they do not change the features) as the batch is read. The hashes are checked
        while reading, not in a pass of their own: data can be a one-shot iterable, and a second pass
        would double the cost of reading it. A batch whose input hash is recorded is taken from the
        cache and body never sees it, so a rerun over the same data reads the data but runs nothing,
        and a resumed run runs body only on the batches not yet recorded.
      - pooling, dtype, compute_dtype, the batch size in effect, and the format version.
    Another body, pooling, dtype or compute_dtype makes the whole cache stale: it is deleted and rebuilt,
    with a StaleCacheWarning saying why. A batch whose inputs differ from the recorded ones (other data) is
    recomputed, with a StaleCacheWarning; batches whose inputs are unchanged keep their features, which
    are the very ones body would compute. Each chunk's byte length and checksum are in the manifest and
    are verified on load: a truncated, corrupt or missing chunk raises CacheError (delete the directory
    to start over). So is the manifest: a manifest of another format, or whose fingerprint is missing or
    damaged, is stale (rebuilt with a warning: nothing in it would be served); one whose other fields
    cannot be what extract_features wrote (a chunk's name, size, shape or dtype, a batch's place in its
    chunk, the totals, a value of the wrong JSON type) raises CacheError before body runs or anything
    is written, as do a batch whose recorded rows differ from the data's or whose bytes do not hash to
    the features recorded for it (an offset or row count off by one).
    Runs that share a cache directory take turns: each holds the directory's lock file (flock; on
    Windows msvcrt's lock) from before it reads the cache until it has its features, and a second run,
    in another process, waits for it with a warning naming the holder, then reuses what the first
    wrote. The system drops such a lock when its holder dies, so a killed run leaves nothing locked. A
    second run on a directory in the process that holds it (a nested call, another thread) raises
    CacheError rather than wait for itself; where files cannot be locked, a warning says so.

    torch.distributed (when initialized): every rank must pass the same body and the same data (no
    DistributedSampler); each rank reads all of it, keeping the labels, but runs body only on its share
    of the batches (batch i on rank i % world_size). With a cache (on a filesystem all ranks see), each
    rank writes its own chunks and journal; after a barrier rank 0 writes the manifest of the whole, and
    every rank then reads the features of all ranks from the cache files. Without one, the features are
    gathered with all_gather_object. Every rank returns all the features, in order. As with any
    collective, an exception on one rank leaves the others waiting.
    """
    if not isinstance(body, nn.Module):
        raise TypeError(f"body must be a torch.nn.Module, not {type(body).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a positive int, not {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    if pooling is not None and pooling not in _POOLINGS:
        raise ValueError(f"pooling must be None, 'cls', 'mean' or 'max', got {pooling!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    if compute_dtype is not None and compute_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"compute_dtype must be torch.bfloat16, torch.float16 or None, got {compute_dtype!r}")
    if cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache must be a directory path or None, not {type(cache).__name__}")
    device = torch.device(device) if device is not None else _body_device(body)
    batches, used_batch_size, total = _batches(data, batch_size)
    rank, world = _dist()

    store = None
    if cache is not None:
        fingerprint = {"format": FORMAT, "body": _hash_body(body), "pooling": pooling,
                       "dtype": _dtype_name(dtype) if dtype is not None else None,
                       "batch_size": used_batch_size,
                       "compute_dtype": _dtype_name(compute_dtype) if compute_dtype is not None else None}
        run_id = secrets.token_hex(8)
        if world > 1:
            bodies = [None] * world
            torch.distributed.all_gather_object(bodies, fingerprint["body"])
            if len(set(bodies)) != 1:
                raise ValueError("extract_features: the body's parameters differ between ranks")
            box = [run_id]
            torch.distributed.broadcast_object_list(box, src=0)
            run_id = box[0]
        store = _Store(os.fspath(cache), fingerprint, rank, world, run_id)
    try:
        return _extract(body, batches, total, store, device, pooling, dtype, compute_dtype, progress, rank,
                        world)
    finally:
        if store is not None:
            store.close()


def _extract(body, batches, total, store, device, pooling, dtype, compute_dtype, progress, rank, world):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc="extract_features", leave=True,
               disable=not progress or rank != 0)
    call = _caller(body)
    flags = [(m, m.training) for m in body.modules()]
    body.eval()
    labels, computed = [], {}
    data_digest = hashlib.blake2b(digest_size=16)
    dim = None
    n = 0
    # on the CPU each batch's activations go into the memory the last batch freed, not into freshly mapped
    # pages (tltorch/_heap.py)
    memory = contextlib.ExitStack()
    try:
        if device.type == "cpu":
            memory.enter_context(reuse_memory())
        for i, batch in enumerate(batches):
            n = i + 1
            inputs, label = _split(batch)
            rows = _rows(inputs)
            if label is not None or labels:
                if label is None or len(labels) != i:
                    raise ValueError(f"batch {i}: some batches carry labels and others do not")
                label = label.detach() if isinstance(label, Tensor) else torch.as_tensor(label)
                label = label.cpu().reshape(-1)
                if label.shape[0] != rows:
                    raise ValueError(f"batch {i} has {rows} inputs but {label.shape[0]} labels")
                labels.append(label)
            mine = i % world == rank
            digest = _hash_inputs(inputs) if store is not None or world > 1 else None
            if world > 1:
                data_digest.update(digest.encode())
            if mine and not (store is not None and store.reuse(i, digest, rows)):
                feats = _forward(body, call, inputs, device, pooling, dtype, compute_dtype)
                if feats.shape[0] != rows:
                    raise ValueError(f"batch {i}: body returned {feats.shape[0]} rows for {rows} inputs")
                if dim is not None and feats.shape[1] != dim:
                    raise ValueError(f"batch {i}: body returned {feats.shape[1]} features, earlier "
                                     f"batches {dim}")
                dim = feats.shape[1]
                if store is not None:
                    store.add(i, digest, feats)
                else:
                    computed[i] = feats
            bar.update(rows)
        if store is not None:
            store.flush()
    except BaseException:
        if store is not None:
            store.flush_quietly()
        raise
    finally:
        memory.close()
        for m, flag in flags:
            m.training = flag
        bar.close()

    if world > 1:
        seen = [None] * world
        torch.distributed.all_gather_object(seen, (n, data_digest.hexdigest()))
        if len(set(seen)) != 1:
            raise ValueError("extract_features: the ranks read different data (batches per rank: "
                             f"{[s[0] for s in seen]}); every rank must pass the same data, in the "
                             "same order (no DistributedSampler)")
    if store is not None:
        parts = store.finish(n)
    else:
        if world > 1:
            everyone = [None] * world
            torch.distributed.all_gather_object(everyone, computed)
            for part in everyone:
                computed.update(part)
        parts = [computed[i] for i in range(n)]
    if parts:
        features = torch.cat(parts)  # outside inference_mode: an ordinary tensor, usable with autograd
    else:
        features = torch.empty(0, 0, dtype=dtype or torch.get_default_dtype())
    if labels:
        return features, torch.cat(labels)
    return features


# ---- data ----------------------------------------------------------------------------------------------

def _batches(data, batch_size):
    """(iterable of batches, batch size in effect or None, total rows or None)."""
    if isinstance(data, Tensor):
        if data.dim() == 0:
            raise ValueError("data is a 0-d tensor; expected one row per example")
        n = data.shape[0]
        return (data[s:s + batch_size] for s in range(0, n, batch_size)), batch_size, n
    if isinstance(data, Mapping):
        if not data or not all(isinstance(v, Tensor) and v.dim() > 0 for v in data.values()):
            raise TypeError("data as a dict must map names to tensors (one row per example), e.g. a "
                            "tokenizer's output with return_tensors='pt'")
        n = next(iter(data.values())).shape[0]
        if any(v.shape[0] != n for v in data.values()):
            raise ValueError("data's tensors have different numbers of rows: "
                             f"{ {k: v.shape[0] for k, v in data.items()} }")
        return ({k: v[s:s + batch_size] for k, v in data.items()} for s in range(0, n, batch_size)), \
            batch_size, n
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, torch.utils.data.DistributedSampler):
            raise ValueError("data's DataLoader uses a DistributedSampler; pass the whole data: "
                             "extract_features shares the batches between ranks itself")
        total = None
        if data.batch_size is not None and not isinstance(data.dataset, IterableDataset):
            total = len(data.sampler)
            if data.drop_last:
                total -= total % data.batch_size
        return data, data.batch_size, total
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        try:
            total = len(data)
        except TypeError:
            total = None
        return loader, batch_size, total
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return data, None, None
    raise TypeError("data must be a torch Dataset, a DataLoader, a tensor, a dict of tensors or an "
                    f"iterable of batches, not {type(data).__name__}")


def _split(batch):
    """(inputs, label or None) of one batch."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        label = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        return inputs, label
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        inputs, label = _split(batch[0])
        if label is not None and len(batch) == 2:
            raise ValueError("a batch is an (input, label) pair whose input also carries labels")
        return inputs, batch[1] if len(batch) == 2 else label
    raise TypeError("each batch must be a tensor, a dict of tensors or an (input, label) pair, not "
                    f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                                                 else ""))


def _rows(inputs) -> int:
    if isinstance(inputs, Mapping):
        t = inputs.get("input_ids")
        if not isinstance(t, Tensor):
            t = next((v for v in inputs.values() if isinstance(v, Tensor)), None)
        if t is None:
            kinds = sorted({type(v).__name__ for v in inputs.values()})
            raise TypeError("a dict batch must hold torch tensors (a tokenizer's output with return_tensors='pt'), "
                            f"got values of type {', '.join(kinds) or 'none'}")
    else:
        t = inputs
    if t.dim() == 0:
        raise ValueError("a batch's input is a 0-d tensor; expected one row per example")
    return t.shape[0]


# ---- the forward pass ----------------------------------------------------------------------------------

def _body_device(body: nn.Module) -> torch.device:
    for t in body.parameters():
        return t.device
    for t in body.buffers():
        return t.device
    return torch.device("cpu")


def _caller(body: nn.Module):
    """How a dict batch is passed to body: all keys as keywords, those forward names, or input_ids alone."""
    try:
        params = inspect.signature(body.forward).parameters.values()
    except (TypeError, ValueError):
        return lambda inputs: body(**inputs)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return lambda inputs: body(**inputs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def call(inputs):
        kwargs = {k: v for k, v in inputs.items() if k in names}
        if kwargs:
            return body(**kwargs)
        return body(inputs["input_ids"] if "input_ids" in inputs else next(iter(inputs.values())))
    return call


def _to(x, device):
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _hidden(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    h = getattr(out, "last_hidden_state", None)
    if h is None and isinstance(out, Mapping):
        h = out.get("last_hidden_state")
    if h is None and isinstance(out, (tuple, list)) and out:
        h = out[0]
    if not isinstance(h, Tensor):
        raise TypeError("body must return a tensor, a tuple whose first element is one, or an output "
                        f"with a last_hidden_state; got {type(out).__name__}")
    return h


def _forward(body, call, inputs, device, pooling, dtype, compute_dtype) -> Tensor:
    inputs = _to(inputs, device)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    autocast = torch.autocast(device.type, dtype=compute_dtype) if compute_dtype is not None \
        else contextlib.nullcontext()
    with torch.inference_mode():
        with autocast:
            out = call(inputs) if isinstance(inputs, Mapping) else body(inputs)
        h = _hidden(out)
        if compute_dtype is not None and h.dtype == compute_dtype:
            h = h.float()
        if h.dim() == 3:
            if pooling is None:
                raise ValueError(f"body returns (batch, tokens, features) hidden states {tuple(h.shape)}; "
                                 "pass pooling='cls', 'mean' or 'max' to get one vector per example")
            h = functional.pool(h, mask.to(h.device) if isinstance(mask, Tensor) else None, pooling)
        elif h.dim() == 2:
            if pooling is not None:
                raise ValueError(f"pooling={pooling!r} needs (batch, tokens, features) outputs, but body "
                                 f"returns {tuple(h.shape)}; pass pooling=None")
        else:
            raise ValueError(f"body returns an output of shape {tuple(h.shape)}; expected (batch, features) "
                             "or (batch, tokens, features)")
        if dtype is not None:
            h = h.to(dtype)
        return h.to("cpu").contiguous()


# ---- torch.distributed ---------------------------------------------------------------------------------

def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
