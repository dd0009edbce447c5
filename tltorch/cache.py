"""The on-disk feature cache of extract_features: a directory that one run at a time holds, and whose
manifest says which bytes are the features of which batch.

Files: chunk files `chunk-<first batch>-<token>.npy` (plain .npy, read without pickle), `manifest.json`
and `.lock` (held by the run using the directory):

    {"format": 2,
     "fingerprint": {"format", "body", "pooling", "dtype", "batch_size", "compute_dtype"},
     "complete": true, "run": id, "num_batches": n, "num_rows": N, "dim": D, "dtype": "float32",
     "chunks": [{"file", "nbytes", "checksum", "rows", "dim", "dtype",
                 "batches": [[batch index, input hash, first row in the chunk, rows, feature hash],
                             ...]}, ...]}

While a run is under way, manifest.json (or manifest.rank<r>.json, one per rank under torch.distributed)
is the journal: rewritten atomically after each chunk, with "complete": false. A chunk may hold rows no
batch record points to any more (a batch recomputed for other data): the feature hash of each batch's
rows is what ties a record to its bytes.

Checked before anything runs or is written: a manifest of another format or fingerprint (body, pooling,
dtype, batch size, compute dtype; a fingerprint without compute_dtype: None) is stale, and the cache is
rebuilt with a StaleCacheWarning; every other field that says which bytes are served must be one
extract_features can have written, or CacheError. Checked as
read: each chunk's length, checksum and .npy header, and each batch's feature hash (blake2b, like the
input and body hashes of the fingerprint). The lock: rank 0 flocks `.lock` (msvcrt's lock on Windows)
from before anything is read until every rank has its features; another process waits, a second call
in this process raises CacheError, and a killed holder's lock dies with it.
"""
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import secrets
import time
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ._io import atomic_write

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

__all__ = ["CacheError", "StaleCacheWarning"]

FORMAT = 2
# A chunk is written once it holds this many bytes of features or has been this long in the making:
# big enough that the manifest is rewritten rarely, small enough that an interruption loses little.
CHUNK_BYTES = 16 << 20
CHUNK_SECONDS = 60.0

MANIFEST = "manifest.json"
LOCK = ".lock"
_JOURNAL_RE = re.compile(r"^manifest\.rank\d+\.json$")
_CHUNK_RE = re.compile(r"^chunk-\d+-[0-9a-f]+\.npy$")
_TMP_RE = re.compile(r"^(chunk-.*\.npy|manifest(\.rank\d+)?\.json)\.tmp-")


class CacheError(RuntimeError):
    """A feature cache on disk is damaged (a chunk truncated, corrupt or missing; a manifest unreadable or
    naming other bytes than the features recorded), or in use by another call in this process."""


class StaleCacheWarning(UserWarning):
    """A feature cache was made by another body, pooling, dtype or data, and is being rebuilt."""


# ---- fingerprints --------------------------------------------------------------------------------------

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


# ---- the manifest --------------------------------------------------------------------------------------

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
              torch.bfloat16: np.uint16}  # numpy has no bfloat16: its bits are stored as uint16
_HASH_RE = re.compile(r"[0-9a-f]{32}")


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
                          f"{new['batch_size']!r})",
            "compute_dtype": f"compute_dtype differs (cached {_short(old.get('compute_dtype'))}, now "
                             f"{new['compute_dtype']!r})"}
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


# ---- the directory's lock ------------------------------------------------------------------------------

_HELD = set()  # (device, inode) of the cache directories an extract_features call in this process holds


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


# ---- the store -----------------------------------------------------------------------------------------

def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


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
