"""extract_features: run a frozen body over a dataset once and keep one feature vector per example,
optionally in a resumable, validated cache on disk.

Cache layout (a directory): chunk files `chunk-<first batch>-<token>.npy` (plain .npy, read without
pickle), `manifest.json` and `.lock` (held by the run using the directory):

    {"format": 2,
     "fingerprint": {"format", "body", "pooling", "dtype", "batch_size"},
     "complete": true, "run": id, "num_batches": n, "num_rows": N, "dim": D, "dtype": "float32",
     "chunks": [{"file", "nbytes", "checksum", "rows", "dim", "dtype",
                 "batches": [[batch index, input hash, first row in the chunk, rows, feature hash],
                             ...]}, ...]}

While a run is under way, manifest.json (or manifest.rank<r>.json, one per rank under torch.distributed)
is the journal: rewritten atomically after each chunk, with "complete": false. A chunk may hold rows no
batch record points to any more (a batch recomputed for other data): the feature hash of each batch's
rows is what ties a record to its bytes.
"""
import contextlib
import errno
import hashlib
import inspect
import io
import json
import os
import re
import secrets
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from . import functional
from ._io import atomic_write

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

__all__ = ["extract_features", "CacheError", "StaleCacheWarning"]

FORMAT = 2
# A chunk is written once it holds this many bytes of features or has been this long in the making:
# big enough that the manifest is rewritten rarely, small enough that an interruption loses little.
CHUNK_BYTES = 16 << 20
CHUNK_SECONDS = 60.0

MANIFEST = "manifest.json"
LOCK = ".lock"
_POOLINGS = ("cls", "mean", "max")
_LABEL_KEYS = ("labels", "label")
_JOURNAL_RE = re.compile(r"^manifest\.rank\d+\.json$")
_CHUNK_RE = re.compile(r"^chunk-\d+-[0-9a-f]+\.npy$")
_TMP_RE = re.compile(r"^(chunk-.*\.npy|manifest(\.rank\d+)?\.json)\.tmp-")


class CacheError(RuntimeError):
    """A feature cache on disk is damaged (a chunk truncated, corrupt or missing; a manifest unreadable or
    naming other bytes than the features recorded), or in use by another call in this process."""


class StaleCacheWarning(UserWarning):
    """A feature cache was made by another body, pooling, dtype or data, and is being rebuilt."""


def extract_features(body: nn.Module, data, *, batch_size: int = 64, pooling: Optional[str] = None,
                     device=None, dtype: Optional[torch.dtype] = None,
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
      - pooling, dtype, the batch size in effect, and the format version.
    Another body, pooling or dtype makes the whole cache stale: it is deleted and rebuilt, with a
    StaleCacheWarning saying why. A batch whose inputs differ from the recorded ones (other data) is
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
    if cache is not None and not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache must be a directory path or None, not {type(cache).__name__}")
    device = torch.device(device) if device is not None else _body_device(body)
    batches, used_batch_size, total = _batches(data, batch_size)
    rank, world = _dist()

    store = None
    if cache is not None:
        fingerprint = {"format": FORMAT, "body": _hash_body(body), "pooling": pooling,
                       "dtype": _dtype_name(dtype) if dtype is not None else None,
                       "batch_size": used_batch_size}
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
        return _extract(body, batches, total, store, device, pooling, dtype, progress, rank, world)
    finally:
        if store is not None:
            store.close()


def _extract(body, batches, total, store, device, pooling, dtype, progress, rank, world):
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
    try:
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
                feats = _forward(body, call, inputs, device, pooling, dtype)
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
            raise TypeError("a dict batch must hold at least one tensor")
    else:
        t = inputs
    if t.dim() == 0:
        raise ValueError("a batch's input is a 0-d tensor; expected one row per example")
    return t.shape[0]


def _tensor_bytes(t: Tensor):
    """The bytes of t's elements in row-major order (any dtype, bfloat16 and bool included)."""
    t = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8).cpu().numpy().data


def _hash_inputs(inputs) -> str:
    h = hashlib.blake2b(digest_size=16)
    items = sorted(inputs.items()) if isinstance(inputs, Mapping) else [("", inputs)]
    for k, v in items:
        if isinstance(v, Tensor):
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}\n".encode())
            h.update(_tensor_bytes(v))
        elif isinstance(v, np.ndarray):
            h.update(f"{k}:{v.dtype}:{v.shape}\n".encode())
            h.update(np.ascontiguousarray(v).tobytes())
        else:
            h.update(f"{k}:{type(v).__name__}:{v!r}\n".encode())
    return h.hexdigest()


def _hash_features(feats: Tensor) -> str:
    return hashlib.blake2b(_tensor_bytes(feats), digest_size=16).hexdigest()


def _hash_body(body: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(body).__module__}.{type(body).__qualname__}\n{body!r}\n".encode())
    for kind, named in (("parameter", body.named_parameters()), ("buffer", body.named_buffers())):
        for name, t in named:
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


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


def _forward(body, call, inputs, device, pooling, dtype) -> Tensor:
    inputs = _to(inputs, device)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    with torch.inference_mode():
        out = call(inputs) if isinstance(inputs, Mapping) else body(inputs)
        h = _hidden(out)
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


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


# ---- the cache -----------------------------------------------------------------------------------------

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
              torch.bfloat16: np.uint16}  # numpy has no bfloat16: its bits are stored as uint16
_HASH_RE = re.compile(r"[0-9a-f]{32}")
_HELD = set()  # (device, inode) of the cache directories an extract_features call in this process holds


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_DTYPES = {_dtype_name(dtype): dtype for dtype in _NP_DTYPES}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _same(a, b) -> bool:
    """Equal and of one JSON type: 7 is neither "7" nor 7.0, and True is not 1."""
    return type(a) is type(b) and a == b


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _is_hash(value) -> bool:
    return isinstance(value, str) and _HASH_RE.fullmatch(value) is not None


def _field(obj: dict, key: str, ok, where: str, expected: str):
    if key not in obj:
        raise ValueError(f"{where}{key!r} is missing")
    value = obj[key]
    if not ok(value):
        raise ValueError(f"{where}{key!r} is {_short(value)}, expected {expected}")
    return value


def _stale_reasons(man: dict, new: dict) -> list:
    """Why the manifest `man` was made by something else than `new` describes (empty: it was not).
    Damage to these fields can only keep features from being served, never serve others: such a cache
    is rebuilt."""
    if not _same(man.get("format"), FORMAT):
        return [f"it has format version {_short(man.get('format'))}, this tltorch writes {FORMAT}"]
    old = man.get("fingerprint")
    if not isinstance(old, dict) or not _same(old.get("format"), new["format"]):
        return ["its fingerprint is missing or damaged"]
    what = {"body": "the body's parameters, buffers or structure differ",
            "pooling": f"pooling differs (cached {_short(old.get('pooling'))}, now {new['pooling']!r})",
            "dtype": f"dtype differs (cached {_short(old.get('dtype'))}, now {new['dtype']!r})",
            "batch_size": f"batch_size differs (cached {_short(old.get('batch_size'))}, now "
                          f"{new['batch_size']!r})"}
    return [msg for key, msg in what.items() if not _same(old.get(key), new[key])]


def _check_manifest(man: dict, whole: bool) -> None:
    """Raise ValueError naming the first field of a manifest (of this format and fingerprint) that
    extract_features cannot have written. Here every field that says which bytes are served: types,
    ranges, each batch's rows inside its chunk and apart from the others', the totals; the bytes
    themselves are checked as they are read (length, checksum, .npy header, each batch's hash).
    whole: manifest.json, whose totals are checked once it is complete (a rank's journal has none)."""
    complete = _field(man, "complete", lambda v: type(v) is bool, "", "true or false")
    _field(man, "run", lambda v: isinstance(v, str), "", "a string")
    chunks = _field(man, "chunks", lambda v: isinstance(v, list), "", "a list")
    files, indices, total = set(), [], 0
    for c, rec in enumerate(chunks):
        where = f"chunks[{c}] "
        if not isinstance(rec, dict):
            raise ValueError(f"chunks[{c}] is {_short(rec)}, expected an object")
        file = _field(rec, "file", lambda v: isinstance(v, str) and _CHUNK_RE.fullmatch(v) is not None, where,
                      "the name of a chunk in the cache directory (chunk-<batch>-<hex>.npy)")
        if file in files:
            raise ValueError(f"chunk {file!r} is listed twice")
        files.add(file)
        _field(rec, "nbytes", _is_count, where, "a byte count")
        _field(rec, "checksum", _is_hash, where, "a hash of 32 hex digits")
        rows = _field(rec, "rows", _is_count, where, "a row count")
        _field(rec, "dim", _is_count, where, "a feature count")
        _field(rec, "dtype", lambda v: isinstance(v, str) and v in _DTYPES, where,
               f"one of {sorted(_DTYPES)}")
        spans, seen = [], set()
        for b, entry in enumerate(_field(rec, "batches", lambda v: isinstance(v, list), where, "a list")):
            at = f"chunks[{c}].batches[{b}]"
            if not (isinstance(entry, list) and len(entry) == 5 and _is_count(entry[0]) and _is_hash(entry[1])
                    and _is_count(entry[2]) and _is_count(entry[3]) and _is_hash(entry[4])):
                raise ValueError(f"{at} is {_short(entry)}, expected [batch index, input hash, first row, "
                                 "rows, feature hash]")
            index, _, offset, count, _ = entry
            if index in seen:
                raise ValueError(f"chunks[{c}] records batch {index} twice")
            seen.add(index)
            if offset + count > rows:
                raise ValueError(f"{at}: batch {index}'s rows {offset}..{offset + count - 1} lie past the "
                                 f"chunk's {rows} rows")
            spans.append((offset, count, index))
        spans.sort()
        for (first, count, i), (after, _, j) in zip(spans, spans[1:]):
            if first + count > after:
                raise ValueError(f"chunks[{c}]: the rows of batches {i} and {j} overlap")
        indices += [i for _, _, i in spans]
        total += sum(count for _, count, _ in spans)
    if not complete:
        return
    n = _field(man, "num_batches", _is_count, "", "a batch count")
    if not whole:
        if len(set(indices)) != len(indices) or any(i >= n for i in indices):
            raise ValueError(f"its chunks record a batch twice, or one past 'num_batches' ({n})")
        return
    if len(indices) != n or sorted(indices) != list(range(n)):
        raise ValueError(f"'num_batches' is {n}, but its chunks do not record each of batches 0..{n - 1} "
                         "once")
    _field(man, "num_rows", lambda v: _same(v, total), "", f"{total}, the sum of its batches' rows")
    kinds = sorted({(rec["dim"], rec["dtype"]) for rec in chunks})
    if len(kinds) > 1:
        raise ValueError(f"its chunks differ in 'dim' or 'dtype': {kinds}")
    dim, dtype = kinds[0] if kinds else (None, None)
    _field(man, "dim", lambda v: _same(v, dim), "", f"{dim!r}, its chunks' 'dim'")
    _field(man, "dtype", lambda v: _same(v, dtype), "", f"{dtype!r}, its chunks' 'dtype'")


# ---- the directory's lock

def _try_lock(fd: int) -> bool:
    """Take the lock of the open lock file fd without waiting: False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):
            return False
        raise  # e.g. a file system without locks
    return True


def _unlock(fd: int) -> None:
    # Explicitly rather than by closing fd: processes forked meanwhile (a DataLoader's workers) share
    # the lock, and would hold it after the close.
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            pid = f.read(32).strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


class _Store:
    """One rank's view of a cache directory during one extract_features call."""

    def __init__(self, path: str, fingerprint: dict, rank: int, world: int, run_id: str):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"cache {path!r} exists and is not a directory")
        os.makedirs(path, exist_ok=True)
        self.dir, self.fp, self.rank, self.world, self.run = path, fingerprint, rank, world, run_id
        self.journal = MANIFEST if world == 1 else f"manifest.rank{rank}.json"
        self.chunks = {}     # file -> chunk record: every valid chunk known, old and new
        self.have = {}       # (batch index, input hash) -> (file, offset, rows, feature hash)
        self.recorded = {}   # batch index -> hashes recorded for it
        self.used = {}       # batch index -> ([index, input hash, offset, rows, feature hash], file)
        self.memory = {}     # file -> features of the chunks this process wrote
        self.loaded = {}     # file -> features read from it, checksum verified
        self.verified = set()  # (file, offset, rows, feature hash) of the batches read and found intact
        self.pending, self.pending_bytes, self.started = [], 0, time.monotonic()
        self.old_batches = None  # num_batches of a complete manifest
        self.warned = False
        self.lock = None     # rank 0: ((device, inode) of the directory, the lock file's fd or None)
        if rank == 0:
            self._lock()
        try:
            _barrier(world)  # no rank reads the directory before rank 0 holds it
            self._open()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        """Hold the directory (rank 0, until every rank has its features): a run that finds it held waits,
        and then reuses what the other wrote. flock's (or msvcrt's) lock dies with its holder, so a
        crashed run never leaves the directory locked; a call in this process that holds the directory
        already (a nested call, another thread) is refused at once rather than wait for itself."""
        st = os.stat(self.dir)
        key = (st.st_dev, st.st_ino)
        if key in _HELD:
            raise CacheError(f"feature cache {self.dir!r} is in use by another extract_features call in this "
                             "process")
        fd, why = None, "no file locks on this platform"
        if fcntl is not None or msvcrt is not None:
            path = os.path.join(self.dir, LOCK)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if not _try_lock(fd):
                    warnings.warn(f"feature cache {self.dir!r} is in use by {_holder(path)}; waiting for it "
                                  "to finish", stacklevel=4)
                    delay = 0.01
                    while not _try_lock(fd):
                        time.sleep(delay)
                        delay = min(2 * delay, 0.5)
            except OSError as e:  # a file system without locks
                os.close(fd)
                fd, why = None, e.strerror or str(e)
            except BaseException:
                os.close(fd)
                raise
            else:
                with contextlib.suppress(OSError):  # the holder's pid, for the warning of a run that waits
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
        if fd is None:
            warnings.warn(f"cannot lock the feature cache {self.dir!r} ({why}): make sure one extraction "
                          "at a time uses it", stacklevel=4)
        self.lock = (key, fd)
        _HELD.add(key)

    def close(self) -> None:
        """Let go of the directory."""
        if self.lock is None:
            return
        key, fd = self.lock
        self.lock = None
        _HELD.discard(key)
        if fd is not None:
            try:
                _unlock(fd)
            finally:
                os.close(fd)

    # -- reading

    def _open(self):
        stale, reasons = [], []
        for name in sorted(os.listdir(self.dir)):
            if name != MANIFEST and not _JOURNAL_RE.match(name):
                continue
            man = self._read_manifest(name)
            if man is None:
                continue
            why = _stale_reasons(man, self.fp)
            if why:
                stale.append(name)
                reasons.extend(r for r in why if r not in reasons)
                continue
            if name == MANIFEST and man["complete"]:
                self.old_batches = man["num_batches"]
            for rec in man["chunks"]:
                self.chunks.setdefault(rec["file"], rec)
        for rec in self.chunks.values():
            self._check_size(rec)
            for index, digest, offset, rows, fhash in rec["batches"]:
                self.have[(index, digest)] = (rec["file"], offset, rows, fhash)
                self.recorded.setdefault(index, set()).add(digest)
        if self.rank == 0:
            if stale:
                warnings.warn(f"feature cache {self.dir!r} is stale and is being rebuilt: "
                              + "; ".join(reasons), StaleCacheWarning, stacklevel=4)
            # Nothing is written before the barrier below, so rank 0 may tidy up: stale manifests,
            # temporaries of killed runs, and chunks no valid manifest records.
            for name in os.listdir(self.dir):
                orphan = _CHUNK_RE.match(name) and name not in self.chunks
                if name in stale or _TMP_RE.match(name) or orphan:
                    self._unlink(name)
        _barrier(self.world)

    def _read_manifest(self, name):
        """The manifest `name` (None if it is gone), checked unless it is stale: nothing of a stale one
        is served."""
        path = os.path.join(self.dir, name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:  # removed by rank 0 as stale while we listed the directory
            return None
        try:
            man = json.loads(raw)
            if not isinstance(man, dict):
                raise ValueError(f"it holds a JSON {type(man).__name__}, not an object")
        except (ValueError, RecursionError) as e:
            raise CacheError(f"feature cache manifest {path!r} is unreadable ({type(e).__name__}: {e}); "
                             f"delete the directory {self.dir!r} to rebuild the cache") from None
        if not _stale_reasons(man, self.fp):
            try:
                _check_manifest(man, whole=name == MANIFEST)
            except ValueError as e:
                raise CacheError(f"feature cache manifest {path!r} is damaged: {e}; delete the directory "
                                 f"{self.dir!r} to rebuild the cache") from None
        return man

    def _damaged(self, what: str) -> CacheError:
        return CacheError(f"feature cache {self.dir!r} is damaged: {what}; delete the directory to rebuild "
                          "the cache")

    def _check_size(self, rec):
        path = os.path.join(self.dir, rec["file"])
        try:
            size = os.path.getsize(path)
        except OSError:
            raise CacheError(f"feature cache chunk {path!r} is missing; delete the directory {self.dir!r} "
                             "to rebuild the cache") from None
        if size != rec["nbytes"]:
            raise CacheError(f"feature cache chunk {path!r} is truncated or damaged: it has {size} bytes, "
                             f"the manifest records {rec['nbytes']}; delete the directory {self.dir!r} to "
                             "rebuild the cache")

    def _load(self, rec) -> Tensor:
        path = os.path.join(self.dir, rec["file"])
        self._check_size(rec)
        data = bytearray(rec["nbytes"])  # writable, so torch.from_numpy can share it without a copy
        with open(path, "rb") as f:
            got = f.readinto(data)
        if got != rec["nbytes"] or hashlib.blake2b(data, digest_size=16).hexdigest() != rec["checksum"]:
            raise CacheError(f"feature cache chunk {path!r} is corrupt: its checksum does not match the "
                             f"manifest's; delete the directory {self.dir!r} to rebuild the cache")
        dtype = _DTYPES[rec["dtype"]]
        head = io.BytesIO(bytes(data[:min(len(data), (1 << 16) + 16)]))
        try:
            version = np.lib.format.read_magic(head)
            shape, fortran, npdtype = (np.lib.format.read_array_header_1_0(head) if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0(head))
        except ValueError as e:
            raise CacheError(f"feature cache chunk {path!r} is not a .npy file ({e})") from None
        if fortran or shape != (rec["rows"], rec["dim"]) or npdtype != np.dtype(_NP_DTYPES[dtype]):
            raise CacheError(f"feature cache chunk {path!r} holds {npdtype} {shape}, the manifest records "
                             f"{rec['dtype']} ({rec['rows']}, {rec['dim']})")
        arr = np.frombuffer(data, dtype=npdtype, count=rec["rows"] * rec["dim"], offset=head.tell())
        return torch.from_numpy(arr.reshape(shape)).view(dtype)

    def _batch(self, rec, index: int, offset: int, rows: int, fhash: str) -> Tensor:
        """Batch `index`'s features: rows offset.. of chunk `rec`, read once and checked against the hash
        recorded for the batch (which no offset or row count but the right ones can match)."""
        feats = self.memory.get(rec["file"])
        if feats is not None:
            return feats[offset:offset + rows]
        feats = self.loaded.get(rec["file"])
        if feats is None:
            feats = self.loaded[rec["file"]] = self._load(rec)
        part = feats[offset:offset + rows]
        key = (rec["file"], offset, rows, fhash)
        if key not in self.verified:
            if part.shape[0] != rows or _hash_features(part) != fhash:
                raise self._damaged(f"rows {offset}..{offset + rows - 1} of chunk {rec['file']!r} are not "
                                    f"the features recorded for batch {index}")
            self.verified.add(key)
        return part

    # -- writing

    def reuse(self, index: int, digest: str, rows: int) -> bool:
        hit = self.have.get((index, digest))
        if hit is not None:
            file, offset, count, fhash = hit
            if count != rows:  # the input hash covers the shapes: the manifest is wrong, not the data
                raise self._damaged(f"its manifest records {count} rows for batch {index}, the data has "
                                    f"{rows}")
            self._batch(self.chunks[file], index, offset, count, fhash)  # refused before anything is written
            self.used[index] = ([index, digest, offset, count, fhash], file)
            return True
        if index in self.recorded and not self.warned:
            self.warned = True
            warnings.warn(f"feature cache {self.dir!r} was made from other data: the inputs of batch {index} "
                          "differ from the cached ones; recomputing the batches that changed",
                          StaleCacheWarning, stacklevel=4)
        return False

    def add(self, index: int, digest: str, feats: Tensor) -> None:
        self.pending.append((index, digest, feats))
        self.pending_bytes += feats.numel() * feats.element_size()
        if self.pending_bytes >= CHUNK_BYTES or time.monotonic() - self.started >= CHUNK_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            self.started = time.monotonic()
            return
        feats = torch.cat([f for _, _, f in self.pending])
        dtype = feats.dtype
        if dtype not in _NP_DTYPES:
            raise TypeError(f"features of dtype {dtype} cannot be cached; pass dtype=torch.float32")
        buf = io.BytesIO()
        np.save(buf, feats.view(torch.int16).numpy().view(np.uint16) if dtype is torch.bfloat16
                else feats.numpy(), allow_pickle=False)
        blob = buf.getvalue()
        name = f"chunk-{self.pending[0][0]:08d}-{secrets.token_hex(6)}.npy"
        atomic_write(os.path.join(self.dir, name), blob)
        entries, offset = [], 0
        for index, digest, f in self.pending:
            entries.append([index, digest, offset, f.shape[0], _hash_features(f)])
            offset += f.shape[0]
        checksum = hashlib.blake2b(blob, digest_size=16).hexdigest()
        rec = {"file": name, "nbytes": len(blob), "checksum": checksum,
               "rows": feats.shape[0], "dim": feats.shape[1], "dtype": _dtype_name(dtype), "batches": entries}
        self.chunks[name] = rec
        self.memory[name] = feats
        for entry in entries:
            self.used[entry[0]] = (entry, name)
        self.pending, self.pending_bytes, self.started = [], 0, time.monotonic()
        self._write_manifest(self.journal, list(self.chunks.values()), complete=False)

    def flush_quietly(self) -> None:
        """On the way out of an exception: keep the finished batches, but never mask the exception."""
        try:
            self.flush()
        except Exception:
            pass

    def _write_manifest(self, name, chunks, complete, **extra):
        man = {"format": FORMAT, "fingerprint": self.fp, "complete": complete, "run": self.run, **extra,
               "chunks": chunks}
        atomic_write(os.path.join(self.dir, name), json.dumps(man, separators=(",", ":")).encode())

    def _unlink(self, name):
        try:
            os.unlink(os.path.join(self.dir, name))
        except FileNotFoundError:
            pass

    def _used_chunks(self):
        """This rank's chunk records cut down to the batches it used."""
        out = {}
        for entry, file in sorted(self.used.values()):
            rec = out.get(file)
            if rec is None:
                rec = out[file] = {k: v for k, v in self.chunks[file].items() if k != "batches"}
                rec["batches"] = []
            rec["batches"].append(entry)
        return out

    def finish(self, n: int) -> list:
        """Write the manifest of the whole (rank 0, after every rank is done) and return the features of
        batches 0..n-1, in order."""
        self.flush()
        error = None
        if self.world == 1:
            error = self._merge([self._used_chunks()], n)
        else:
            self._write_manifest(self.journal, list(self._used_chunks().values()), complete=True,
                                 num_batches=n)
            _barrier(self.world)
            if self.rank == 0:
                try:
                    parts = []
                    for r in range(self.world):
                        man = self._read_manifest(f"manifest.rank{r}.json")
                        if (man is None or _stale_reasons(man, self.fp) or man["run"] != self.run
                                or not man["complete"]):
                            raise CacheError(f"rank {r}'s journal in {self.dir!r} is missing")
                        parts.append({rec["file"]: rec for rec in man["chunks"]})
                    error = self._merge(parts, n)
                except Exception as e:  # every rank must learn of it, or the others wait forever
                    error = e
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise error
        man = self._read_manifest(MANIFEST) if self.world > 1 else self.final
        if man is None or _stale_reasons(man, self.fp) or man["run"] != self.run or man["num_batches"] != n:
            raise CacheError(f"feature cache manifest {os.path.join(self.dir, MANIFEST)!r} is missing")
        where = {}
        for rec in man["chunks"]:
            for index, _, offset, rows, fhash in rec["batches"]:
                where[index] = (rec, index, offset, rows, fhash)
        parts = [self._batch(*where[i]) for i in range(n)]
        _barrier(self.world)  # rank 0 holds the directory until every rank has read its features
        return parts

    def _merge(self, parts: list, n: int):
        """Rank 0: the manifest of the whole from every rank's used chunks; then delete what it does not
        record. Returns an exception to raise on every rank, or None."""
        chunks = {}
        for part in parts:
            for file, rec in part.items():
                if file in chunks:
                    chunks[file]["batches"] = sorted(chunks[file]["batches"] + rec["batches"])
                else:
                    chunks[file] = dict(rec)
        seen = sorted(index for rec in chunks.values() for index, *_ in rec["batches"])
        if seen != list(range(n)):
            return CacheError(f"feature cache {self.dir!r}: the ranks' chunks do not cover batches "
                              f"0..{n - 1}")
        if len({(rec["dim"], rec["dtype"]) for rec in chunks.values()}) > 1:
            return CacheError(f"feature cache {self.dir!r}: chunks of different feature sizes or dtypes")
        first = next(iter(chunks.values()), None)
        if self.old_batches is not None and self.old_batches != n and self.rank == 0:
            warnings.warn(f"feature cache {self.dir!r} was made from other data: it held {self.old_batches} "
                          f"batches, the data has {n}", StaleCacheWarning, stacklevel=5)
        records = sorted(chunks.values(), key=lambda rec: rec["batches"][0][0])
        self.final = {"format": FORMAT, "fingerprint": self.fp, "complete": True, "run": self.run,
                      "num_batches": n,
                      "num_rows": sum(entry[3] for rec in records for entry in rec["batches"]),
                      "dim": first["dim"] if first else None, "dtype": first["dtype"] if first else None,
                      "chunks": records}
        atomic_write(os.path.join(self.dir, MANIFEST),
                     json.dumps(self.final, separators=(",", ":")).encode())
        for name in os.listdir(self.dir):
            if _JOURNAL_RE.match(name) or (_CHUNK_RE.match(name) and name not in chunks):
                self._unlink(name)
        return None
