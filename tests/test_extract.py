"""tltorch.extract_features against a plain inference loop with the pooling done by hand in float64, and
its cache: reruns that never run the body, resumption after an exception or a SIGKILL (bitwise the
features of an uninterrupted run, the body run only on what was missing), stale caches rebuilt with a
warning (any input, parameter or buffer changed), damaged chunks and damaged manifests refused (never
wrong rows), processes sharing one cache directory taking turns; plus every data form, labels, dtype,
the progress bar and argument errors. The cache under torch.distributed is in test_extract_ddp.py."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import tltorch.cache
import tltorch.extract
from conftest import assert_close
from tltorch.extract import CacheError, StaleCacheWarning, extract_features

VOCAB, T, B, NB = 50, 9, 7, 6  # token ids < VOCAB, T tokens, B rows a batch, NB batches


def token_body():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, 16))


def bert_body():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=37, vocab_size=60)
    return transformers.BertModel(cfg)


def token_batches(n=NB, seed=1, empty_row=True, labels=False):
    """n dicts of input_ids and attention_mask (B, T): random lengths, padding at the end; batch 0's row
    1 has no token when empty_row. The last batch is shorter. With labels: (dict, label) pairs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        rows = B if i < n - 1 else B - 3
        ids = torch.randint(0, VOCAB, (rows, T), generator=g)
        lengths = torch.randint(1, T + 1, (rows,), generator=g)
        if i == 0 and empty_row:
            lengths[1] = 0
        mask = (torch.arange(T) < lengths[:, None]).long()
        batch = {"input_ids": ids, "attention_mask": mask}
        out.append((batch, torch.arange(rows) + 100 * i) if labels else batch)
    return out


def ref_pool(h, mask, pooling):
    """(B, D) float64 from hidden states (B, T, D): first token, or mean / max over the masked tokens
    (zeros for a row with none)."""
    h = h.double()
    if pooling == "cls":
        return h[:, 0]
    m = mask.bool()[..., None]
    if pooling == "mean":
        return (h * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.where(m.any(1), h.masked_fill(~m, float("-inf")).amax(1), 0.0)


def reference(body, batches, pooling):
    """A plain inference loop in eval mode, pooled by hand in float64."""
    was = body.training
    body.eval()
    out = []
    with torch.no_grad():
        for b in batches:
            b = b[0] if isinstance(b, tuple) else b
            if isinstance(body, nn.Sequential):
                h = body(b["input_ids"])
            else:
                h = body(**b).last_hidden_state
            out.append(ref_pool(h, b["attention_mask"], pooling))
    body.train(was)
    return torch.cat(out)


class Probe:
    """Counts the body's forward calls; raises from call number fail_at + 1 on (not in the body's repr or
    state, so the cache's fingerprint does not see it)."""

    def __init__(self, body, fail_at=None):
        self.calls, self.fail_at = 0, fail_at
        self.handle = body.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("body failed")


LOCK = ".lock"  # the lock file a run holds; it stays in the directory


def cache_files(path):
    """(manifest, the files in the directory but the lock, the files the manifest records)."""
    man = json.loads((path / "manifest.json").read_text())
    recorded = sorted(["manifest.json"] + [c["file"] for c in man["chunks"]])
    return man, sorted(p.name for p in path.iterdir() if p.name != LOCK), recorded


@contextlib.contextmanager
def no_stale_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCacheWarning)
        yield


@pytest.fixture
def per_batch_chunks(monkeypatch):
    monkeypatch.setattr(tltorch.cache, "CHUNK_BYTES", 1)


# ---- features and labels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
@pytest.mark.parametrize("kind", ["sequential", "bert"])
def test_matches_reference(kind, pooling):
    body = token_body() if kind == "sequential" else bert_body()
    batches = token_batches(empty_row=kind == "sequential")  # BERT has no meaning for a row of no tokens
    feats = extract_features(body, batches, pooling=pooling, progress=False)
    want = reference(body, batches, pooling)
    assert feats.shape == want.shape and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert not feats.is_inference()
    assert_close(feats, want, torch.float32, what=f"{kind} {pooling}")


class Head(nn.Module):
    """(B, D) features returned as a tensor, a tuple, or a dict with last_hidden_state."""

    def __init__(self, form):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.form = nn.Linear(8, 5), form

    def forward(self, x):
        y = self.lin(x)
        return {"tensor": y, "tuple": (y, x), "dict": {"last_hidden_state": y, "x": x}}[self.form]


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict"])
def test_2d_outputs_from_a_tensor(form, gen):
    body = Head(form)
    x = torch.randn(23, 8, generator=gen)
    feats = extract_features(body, x, batch_size=5, progress=False)
    want = x.double() @ body.lin.weight.double().t() + body.lin.bias.double()
    assert_close(feats, want, torch.float32, what=form)


class DictSamples(Dataset):
    def __init__(self, batches):
        self.rows = [({k: v[r] for k, v in b.items()}, int(y[r])) for b, y in batches for r in range(len(y))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        sample, y = self.rows[i]
        return {**sample, "label": y}


@pytest.mark.parametrize("form", ["pairs", "generator", "dataset", "dataloader", "tensor_dataset",
                                  "whole_dict", "dict_labels"])
def test_data_forms_and_labels(form):
    body = token_body()
    batches = token_batches(labels=True)
    ids = torch.cat([b["input_ids"] for b, _ in batches])
    mask = torch.cat([b["attention_mask"] for b, _ in batches])
    y = torch.cat([lab for _, lab in batches])
    want_labels = y
    if form == "pairs":
        data = batches
    elif form == "generator":
        data = (b for b in batches)
    elif form == "dataset":
        data = DictSamples(batches)
    elif form == "dataloader":
        data = DataLoader(DictSamples(batches), batch_size=4)
    elif form == "tensor_dataset":  # (ids, label) pairs: the token body sees the ids only, no mask
        data, mask = TensorDataset(ids, y), torch.ones_like(mask)
    elif form == "whole_dict":
        data, want_labels = {"input_ids": ids, "attention_mask": mask}, None
    else:
        data = [{**b, "labels": lab} for b, lab in batches]
    out = extract_features(body, data, batch_size=5, pooling="mean", progress=False)
    feats, labels = out if want_labels is not None else (out, None)
    want = reference(body, [{"input_ids": ids, "attention_mask": mask}], "mean")
    assert_close(feats, want, torch.float32, what=form)
    if want_labels is None:
        assert isinstance(out, torch.Tensor)
    else:
        assert torch.equal(labels, want_labels)


def test_eval_mode_inference_mode_and_flags_restored():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Dropout(0.5), nn.Linear(16, 16))
    body.train()
    body[2].eval()  # a mixed state must come back as it was, module by module
    seen = []
    body[1].register_forward_pre_hook(
        lambda m, a: seen.append((m.training, torch.is_inference_mode_enabled())))
    batches = token_batches(n=2)
    feats = extract_features(body, batches, pooling="max", progress=False)
    assert seen == [(False, True)] * 2
    assert [m.training for m in body] == [True, True, False] and body.training
    assert_close(feats, reference(body, batches, "max"), torch.float32)  # dropout was off


def test_pooling_must_match_the_output():
    with pytest.raises(ValueError, match="pooling='cls', 'mean' or 'max'"):
        extract_features(token_body(), token_batches(n=1), progress=False)
    with pytest.raises(ValueError, match="pooling=None"):
        extract_features(Head("tensor"), torch.randn(4, 8), pooling="mean", progress=False)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(pooling="sum"), ValueError, "pooling must be"),
    (dict(pooling="MEAN"), ValueError, "pooling must be"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=-3), ValueError, "batch_size"),
    (dict(batch_size=2.0), TypeError, "batch_size"),
    (dict(batch_size=True), TypeError, "batch_size"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
    (dict(dtype="float16"), TypeError, "dtype"),
    (dict(cache=3), TypeError, "cache"),
    (dict(body=lambda x: x), TypeError, "body must be a torch.nn.Module"),
    (dict(body=None), TypeError, "body must be a torch.nn.Module"),
    (dict(data=3), TypeError, "data must be"),
    (dict(data=[(torch.zeros(2, 3, dtype=torch.long),) * 3]), TypeError, "each batch"),
    (dict(data=[(torch.zeros(2, T, dtype=torch.long), torch.zeros(3))]), ValueError, "labels"),
    (dict(data=[{"input_ids": np.zeros((2, T), dtype=np.int64)}]), TypeError, "return_tensors='pt'.*ndarray"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(body=token_body(), data=token_batches(n=1), pooling="mean", progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        extract_features(args.pop("body"), args.pop("data"), **args)


def test_cache_path_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        extract_features(token_body(), token_batches(n=1), pooling="mean", cache=tmp_path / "file",
                         progress=False)


def test_progress_bar(capsys):
    extract_features(token_body(), token_batches(), pooling="mean", progress=True)
    err = capsys.readouterr().err
    assert "extract_features" in err and "rows/s" in err
    extract_features(token_body(), token_batches(), pooling="mean", progress=False)
    assert capsys.readouterr().err == ""


# ---- the cache ------------------------------------------------------------------------------------------

def test_cache_errors_are_one_class_under_both_names():
    """The cache lives in tltorch.cache; tltorch.extract, where users and the README name them, serves
    the same classes, so an except clause written with either name catches what the cache raises."""
    assert tltorch.extract.CacheError is tltorch.cache.CacheError
    assert tltorch.extract.StaleCacheWarning is tltorch.cache.StaleCacheWarning
    assert {"CacheError", "StaleCacheWarning"} <= set(tltorch.extract.__all__) & set(tltorch.cache.__all__)


def test_rerun_loads_without_running_the_body(tmp_path):
    body = token_body()
    batches = token_batches(labels=True)
    feats, labels = extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
    assert_close(feats, reference(body, batches, "mean"), torch.float32)
    man, files, recorded = cache_files(tmp_path)
    assert files == recorded and man["complete"] and man["num_batches"] == NB
    assert man["fingerprint"]["pooling"] == "mean" and man["fingerprint"]["format"] == tltorch.cache.FORMAT
    for c in man["chunks"]:  # plain .npy, no pickle, the recorded length
        assert np.load(tmp_path / c["file"], allow_pickle=False).shape == (c["rows"], 16)
        assert (tmp_path / c["file"]).stat().st_size == c["nbytes"]
    probe = Probe(body, fail_at=0)
    with no_stale_warning():
        again, labels2 = extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
    assert probe.calls == 0
    assert torch.equal(again, feats) and torch.equal(labels2, labels) and not again.is_inference()


@pytest.mark.parametrize("chunking", ["per_batch", "default"])
@pytest.mark.parametrize("source", ["data", "body"])
def test_resume_after_an_exception(tmp_path, monkeypatch, source, chunking):
    """Interrupted after k batches: the rerun runs the body on the other NB - k only, and its features
    are bitwise those of an uninterrupted run. With the default chunk size the k finished batches are
    written out as the exception passes."""
    if chunking == "per_batch":
        monkeypatch.setattr(tltorch.cache, "CHUNK_BYTES", 1)
    body = token_body()
    batches = token_batches(labels=True)
    full, full_labels = extract_features(body, batches, pooling="max", progress=False)
    k = 3

    def failing_data():
        yield from batches[:k]
        raise KeyError("data failed")

    if source == "data":
        with pytest.raises(KeyError, match="data failed"):
            extract_features(body, failing_data(), pooling="max", cache=tmp_path, progress=False)
    else:
        probe = Probe(body, fail_at=k)
        with pytest.raises(RuntimeError, match="body failed"):
            extract_features(body, batches, pooling="max", cache=tmp_path, progress=False)
        probe.handle.remove()
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert not man["complete"] and sum(len(c["batches"]) for c in man["chunks"]) == k
    probe = Probe(body)
    with no_stale_warning():
        feats, labels = extract_features(body, batches, pooling="max", cache=tmp_path, progress=False)
    assert probe.calls == NB - k
    assert torch.equal(feats, full) and torch.equal(labels, full_labels)
    _, files, recorded = cache_files(tmp_path)
    assert files == recorded


CHILD = r"""
import os, sys, time
sys.path.insert(0, sys.argv[4])
import torch
import tltorch.cache
import tltorch.extract as ex
from test_extract import token_body, token_batches

stage, cache, ready = sys.argv[1:4]
tltorch.cache.CHUNK_BYTES = 1  # a chunk per batch
def stall():
    open(ready, "w").close()
    time.sleep(600)

real_replace, chunks = os.replace, []
def replace(src, dst):
    if not os.path.basename(dst).startswith("chunk-"):
        return real_replace(src, dst)
    chunks.append(dst)
    if stage == "chunk" and len(chunks) == 3:  # killed while the third chunk is half written
        with open(src, "r+b") as f:
            f.truncate(os.path.getsize(src) // 2)
        stall()
    real_replace(src, dst)
    if stage == "manifest" and len(chunks) == 3:  # killed with the third chunk in place, not recorded
        stall()
os.replace = replace

body = token_body()
calls = []
def hook(module, args):
    calls.append(1)
    if stage == "body" and len(calls) == 4:  # killed inside the body, three chunks recorded
        stall()
body.register_forward_pre_hook(hook)
ex.extract_features(body, token_batches(), pooling="mean", cache=cache, progress=False)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("stage, recorded", [("body", 3), ("chunk", 2), ("manifest", 2)])
def test_resume_after_sigkill(tmp_path, stage, recorded):
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    tests = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.Popen([sys.executable, "-c", CHILD, stage, str(cache), str(ready), tests],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the child never reached the kill point"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    leftovers = [p.name for p in cache.iterdir()]
    if stage == "chunk":
        assert any(".tmp-" in name for name in leftovers)
    man = json.loads((cache / "manifest.json").read_text())
    assert sum(len(c["batches"]) for c in man["chunks"]) == recorded

    body = token_body()
    full = extract_features(body, token_batches(), pooling="mean", progress=False)
    probe = Probe(body)
    with no_stale_warning():
        feats = extract_features(body, token_batches(), pooling="mean", cache=cache, progress=False)
    assert probe.calls == NB - recorded
    assert torch.equal(feats, full)
    _, files, in_manifest = cache_files(cache)
    assert files == in_manifest  # the temporary and the unrecorded chunk are gone


@pytest.mark.parametrize("change, calls, match", [
    ("weight", NB, "body's parameters"),
    ("pooling", NB, "pooling differs"),
    ("dtype", NB, "dtype differs"),
    ("data", 1, "other data: the inputs of batch 2"),
    ("mask", 1, "other data: the inputs of batch 2"),
    ("fewer", 0, "it held 6 batches, the data has 5"),
])
def test_stale_cache_is_rebuilt_with_a_warning(tmp_path, per_batch_chunks, change, calls, match):
    body = token_body()
    batches = token_batches()
    first = extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
    pooling, dtype = "mean", None
    if change == "weight":
        with torch.no_grad():
            body[1].weight[3, 5] += 0.25
    elif change == "pooling":
        pooling = "cls"
    elif change == "dtype":
        dtype = torch.float16
    elif change == "data":
        batches[2] = {**batches[2], "input_ids": batches[2]["input_ids"].roll(1, dims=1)}
    elif change == "mask":  # the same tokens, only the first one counted
        mask = torch.zeros_like(batches[2]["attention_mask"])
        mask[:, 0] = 1
        batches[2] = {**batches[2], "attention_mask": mask}
    else:
        batches = batches[:-1]
    want = extract_features(body, batches, pooling=pooling, dtype=dtype, progress=False)
    if change in ("weight", "pooling", "data", "mask"):
        assert not torch.equal(want, first)
    probe = Probe(body)
    with pytest.warns(StaleCacheWarning, match=match):
        feats = extract_features(body, batches, pooling=pooling, dtype=dtype, cache=tmp_path, progress=False)
    assert probe.calls == calls
    assert torch.equal(feats, want)
    _, files, recorded = cache_files(tmp_path)
    assert files == recorded  # nothing stale is left behind
    probe.fail_at = probe.calls
    with no_stale_warning():
        again = extract_features(body, batches, pooling=pooling, dtype=dtype, cache=tmp_path, progress=False)
    assert torch.equal(again, want)


@pytest.mark.parametrize("damage, match", [("truncated", "truncated"), ("corrupt", "corrupt"),
                                           ("missing", "missing"), ("manifest", "unreadable")])
def test_damaged_cache_raises(tmp_path, per_batch_chunks, damage, match):
    body = token_body()
    extract_features(body, token_batches(), pooling="mean", cache=tmp_path, progress=False)
    man = json.loads((tmp_path / "manifest.json").read_text())
    chunk = tmp_path / man["chunks"][2]["file"]
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:-5])
    elif damage == "corrupt":
        raw = bytearray(chunk.read_bytes())
        raw[-3] ^= 0x40
        chunk.write_bytes(bytes(raw))
    elif damage == "missing":
        chunk.unlink()
    else:
        (tmp_path / "manifest.json").write_text('{"format": 1, "chunks": [')
    probe = Probe(body)
    with pytest.raises(CacheError, match=match):
        extract_features(body, token_batches(), pooling="mean", cache=tmp_path, progress=False)
    assert probe.calls == 0


def test_changed_buffers_make_the_cache_stale(tmp_path, gen):
    """BatchNorm's running statistics are buffers, not parameters, and change the features in eval mode."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5))
    x = torch.randn(23, 8, generator=gen)
    first = extract_features(body, x, batch_size=5, cache=tmp_path, progress=False)
    with torch.no_grad():
        body[1].running_mean += 0.5
    want = extract_features(body, x, batch_size=5, progress=False)
    assert not torch.equal(want, first)
    probe = Probe(body)
    with pytest.warns(StaleCacheWarning, match="body's parameters"):
        feats = extract_features(body, x, batch_size=5, cache=tmp_path, progress=False)
    assert probe.calls == 5 and torch.equal(feats, want)


def gapped_cache(path):
    """A cache of token_batches() in one chunk, then rerun with other inputs for batch 2: the first chunk
    keeps batches 0, 1, 3, 4, 5 around a hole of 7 rows no longer served, the second holds batch 2.
    Returns the body, the new batches and their features."""
    body = token_body()
    batches = token_batches()
    extract_features(body, batches, pooling="mean", cache=path, progress=False)
    batches[2] = {**batches[2], "input_ids": batches[2]["input_ids"].flip(0)}
    with pytest.warns(StaleCacheWarning, match="other data"):
        feats = extract_features(body, batches, pooling="mean", cache=path, progress=False)
    man = json.loads((path / "manifest.json").read_text())
    assert [[b[0] for b in c["batches"]] for c in man["chunks"]] == [[0, 1, 3, 4, 5], [2]]
    assert [b[2] for b in man["chunks"][0]["batches"]] == [0, 7, 21, 28, 35]
    return body, batches, feats


def _set(path, value):
    """A mutation setting man[path...] (value: a function of the old value, or DELETE)."""
    def mutate(man):
        obj = man
        for key in path[:-1]:
            obj = obj[key]
        if value is DELETE:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value(obj[path[-1]])
        return man
    return mutate


DELETE = object()
A, H = ("chunks", 0), ("chunks", 0, "batches")  # the first chunk, its batches (indices 0, 1, 3, 4, 5)


def _swap_offsets(man):
    b = man["chunks"][0]["batches"]
    b[0][2], b[1][2] = b[1][2], b[0][2]
    return man


def _swap_files(man):
    a, c = man["chunks"]
    a["file"], c["file"] = c["file"], a["file"]
    return man


def _rows_and_total(man):
    man["chunks"][0]["batches"][1][3] -= 1
    man["num_rows"] -= 1
    return man


# name: (mutation of the manifest, "error" (CacheError) or "stale" (rebuilt with a warning), message)
MUTATIONS = {
    "offset+1 into the hole": (_set(H + (1, 2), lambda v: v + 1), "error",
                               "not the features recorded for batch 1"),
    "offset+1 onto the next batch": (_set(H + (0, 2), lambda v: v + 1), "error", "overlap"),
    "offset+1 past the chunk": (_set(H + (4, 2), lambda v: v + 1), "error", "past the chunk's 39 rows"),
    "offsets swapped": (_swap_offsets, "error", "not the features recorded for batch 0"),
    "offset a string": (_set(H + (1, 2), str), "error", r"chunks\[0\]\.batches\[1\]"),
    "offset negative": (_set(H + (1, 2), lambda v: -1), "error", r"chunks\[0\]\.batches\[1\]"),
    "offset huge": (_set(H + (1, 2), lambda v: 10 ** 30), "error", "past the chunk's 39 rows"),
    "rows-1": (_set(H + (1, 3), lambda v: v - 1), "error", "num_rows"),
    "rows-1 and the total too": (_rows_and_total, "error", "6 rows for batch 1, the data has 7"),
    "rows a float": (_set(H + (1, 3), float), "error", r"chunks\[0\]\.batches\[1\]"),
    "rows huge": (_set(H + (1, 3), lambda v: 2 ** 70), "error", "past the chunk's 39 rows"),
    "index a bool": (_set(H + (0, 0), bool), "error", r"chunks\[0\]\.batches\[0\]"),
    "index twice in a chunk": (_set(H + (2, 0), lambda v: 1), "error", "batch 1 twice"),
    "input hash an int": (_set(H + (1, 1), lambda v: 7), "error", r"chunks\[0\]\.batches\[1\]"),
    "input hash of other data": (_set(H + (1, 1), lambda v: "0" * 32), "stale",
                                 "other data: the inputs of batch 1"),
    "feature hash missing": (_set(H + (1,), lambda v: v[:4]), "error", r"chunks\[0\]\.batches\[1\]"),
    "batches missing": (_set(A + ("batches",), DELETE), "error", "'batches' is missing"),
    "chunk rows+1": (_set(A + ("rows",), lambda v: v + 1), "error", "holds"),
    "chunk rows-1": (_set(A + ("rows",), lambda v: v - 1), "error", "past the chunk's 38 rows"),
    "chunk rows negative": (_set(A + ("rows",), lambda v: -39), "error", "'rows' is -39"),
    "chunk dim+1": (_set(A + ("dim",), lambda v: v + 1), "error", "dim"),
    "chunk dtype float16": (_set(A + ("dtype",), lambda v: "float16"), "error", "dtype"),
    "chunk dtype int64": (_set(A + ("dtype",), lambda v: "int64"), "error", "'dtype' is 'int64'"),
    "chunk dtype a number": (_set(A + ("dtype",), lambda v: 3), "error", "'dtype' is 3"),
    "file ../": (_set(("chunks", 1, "file"), lambda v: "../" + v), "error", "'file' is '../chunk-"),
    "file absolute": (_set(("chunks", 1, "file"), lambda v: "/etc/passwd"), "error",
                      "'file' is '/etc/passwd'"),
    "file elsewhere": (_set(("chunks", 1, "file"), lambda v: "chunk-00000002-0123456789ab.npy/../" + v),
                       "error", "'file' is"),
    "file absent": (_set(("chunks", 1, "file"), lambda v: "chunk-00000002-0123456789ab.npy"), "error",
                    "missing"),
    "files swapped": (_swap_files, "error", "truncated or damaged"),
    "file listed twice": (lambda m: {**m, "chunks": m["chunks"] + m["chunks"][1:]}, "error", "listed twice"),
    "nbytes a string": (_set(A + ("nbytes",), str), "error", "'nbytes' is '"),
    "nbytes huge": (_set(A + ("nbytes",), lambda v: 10 ** 30), "error", "truncated or damaged"),
    "checksum missing": (_set(A + ("checksum",), DELETE), "error", "'checksum' is missing"),
    "checksum altered": (_set(A + ("checksum",), lambda v: v[::-1]), "error", "corrupt"),
    "num_batches+1": (_set(("num_batches",), lambda v: v + 1), "error", "num_batches"),
    "num_batches a string": (_set(("num_batches",), str), "error", "'num_batches' is '6'"),
    "num_batches huge": (_set(("num_batches",), lambda v: 10 ** 30), "error", "num_batches"),
    "num_rows+1": (_set(("num_rows",), lambda v: v + 1), "error", "num_rows"),
    "dim of the whole": (_set(("dim",), lambda v: v + 1), "error", "'dim' is 17"),
    "dtype of the whole": (_set(("dtype",), lambda v: "float16"), "error", "'dtype' is 'float16'"),
    "complete a string": (_set(("complete",), lambda v: "yes"), "error", "'complete' is 'yes'"),
    "chunks missing": (_set(("chunks",), DELETE), "error", "'chunks' is missing"),
    "chunks an object": (_set(("chunks",), lambda v: {"0": v[0]}), "error", "'chunks' is"),
    "a list, not an object": (lambda m: [m], "error", "not an object"),
    "format a string": (_set(("format",), str), "stale", "format version"),
    "format missing": (_set(("format",), DELETE), "stale", "format version"),
    "fingerprint missing": (_set(("fingerprint",), DELETE), "stale", "fingerprint"),
    "fingerprint a string": (_set(("fingerprint",), lambda v: "x"), "stale", "fingerprint"),
    "batch_size a string": (_set(("fingerprint", "batch_size"), str), "stale", "batch_size differs"),
    "pooling a list": (_set(("fingerprint", "pooling"), lambda v: [v]), "stale", "pooling differs"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_damaged_manifest_is_refused_or_rebuilt(tmp_path, name):
    """Every manifest field that says which bytes are served is checked: a damaged one raises CacheError
    before anything is run or written, or, for the fields that say what made the cache, makes it stale;
    never are other rows served."""
    mutate, outcome, match = MUTATIONS[name]
    body, batches, want = gapped_cache(tmp_path)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(mutate(json.loads(manifest.read_text()))))
    before = manifest.read_bytes()
    probe = Probe(body)
    if outcome == "error":
        with pytest.raises(CacheError, match=match):
            extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
        assert probe.calls == 0 and manifest.read_bytes() == before
    else:
        with pytest.warns(StaleCacheWarning, match=match):
            feats = extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
        assert torch.equal(feats, want)
        probe.fail_at = probe.calls
        with no_stale_warning():
            again = extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
        assert torch.equal(again, want)


@pytest.mark.parametrize("mutate, match", [
    (_set(H + (1, 3), lambda v: v - 1), "6 rows for batch 1, the data has 7"),
    (_set(H + (1, 2), lambda v: v + 1), "the rows of batches 1 and 2 overlap"),
    (_set(H + (3, 2), lambda v: v + 1), "past the chunk's 28 rows"),
    (_set(H + (3, 3), lambda v: v - 1), "6 rows for batch 3, the data has 7"),
])
def test_damaged_journal_is_refused(tmp_path, mutate, match):
    """The journal of an interrupted run (no totals in it) is checked as strictly."""
    body = token_body()
    batches = token_batches()

    def interrupted():
        yield from batches[:4]
        raise KeyError("data failed")
    with pytest.raises(KeyError):
        extract_features(body, interrupted(), pooling="mean", cache=tmp_path, progress=False)
    manifest = tmp_path / "manifest.json"
    man = json.loads(manifest.read_text())
    assert not man["complete"] and [b[2] for b in man["chunks"][0]["batches"]] == [0, 7, 14, 21]
    manifest.write_text(json.dumps(mutate(man)))
    probe = Probe(body)
    with pytest.raises(CacheError, match=match):
        extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
    assert probe.calls == 0


CONCURRENT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[3])
import torch
import tltorch.cache
import tltorch.extract as ex
from test_extract import token_body, token_batches

cache, go, out = sys.argv[1], sys.argv[2], sys.argv[4]
tltorch.cache.CHUNK_BYTES = 1  # a chunk and a manifest per batch: many writes to interleave
body = token_body()
calls = []
def slow(module, args):  # the runs overlap by seconds, whatever the machine's load
    calls.append(1)
    time.sleep(0.3)
body.register_forward_pre_hook(slow)
open(out + ".ready", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
feats = ex.extract_features(body, token_batches(), pooling="mean", cache=cache, progress=False)
torch.save({"feats": feats, "calls": len(calls)}, out)
"""


def test_concurrent_runs_take_turns(tmp_path):
    """Two processes started together on one cache directory: one computes, the other waits and then
    reads its features; the directory is left whole, and a third run reads it without the body."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    tests = os.path.dirname(os.path.abspath(__file__))
    outs = [tmp_path / f"out{k}.pt" for k in range(2)]
    children = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(cache), str(go), tests, str(out)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for out in outs]
    try:
        deadline = time.monotonic() + 120
        while not all(os.path.exists(f"{out}.ready") for out in outs):
            assert all(c.poll() is None for c in children), [c.stdout.read().decode() for c in children]
            assert time.monotonic() < deadline, "the children never got ready"
            time.sleep(0.05)
        go.touch()
        logs = [c.communicate(timeout=120)[0].decode() for c in children]
    finally:
        for c in children:
            c.kill()
            c.wait()
    assert [c.returncode for c in children] == [0, 0], logs

    body = token_body()
    want = extract_features(body, token_batches(), pooling="mean", progress=False)
    got = [torch.load(out) for out in outs]
    for g in got:
        assert torch.equal(g["feats"], want)
    assert sorted(g["calls"] for g in got) == [0, NB]  # the second to start waited, then ran nothing
    probe = Probe(body, fail_at=0)
    with no_stale_warning():
        feats = extract_features(body, token_batches(), pooling="mean", cache=cache, progress=False)
    assert probe.calls == 0 and torch.equal(feats, want)
    _, files, recorded = cache_files(cache)
    assert files == recorded


def test_nested_run_on_one_cache_raises(tmp_path):
    """A second extraction into a directory this process is extracting into fails at once, instead of
    waiting for itself."""
    body = token_body()
    batches = token_batches()

    def data():
        yield batches[0]
        extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
        yield from batches[1:]
    with pytest.raises(CacheError, match="in use by another extract_features call in this process"):
        extract_features(body, data(), pooling="mean", cache=tmp_path, progress=False)
    # the lock went with the call that held it
    feats = extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
    assert torch.equal(feats, extract_features(body, batches, pooling="mean", progress=False))


def test_without_file_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(tltorch.cache, "fcntl", None)
    monkeypatch.setattr(tltorch.cache, "msvcrt", None)
    body = token_body()
    with pytest.warns(UserWarning, match="cannot lock"):
        feats = extract_features(body, token_batches(), pooling="mean", cache=tmp_path, progress=False)
    assert torch.equal(feats, extract_features(body, token_batches(), pooling="mean", progress=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cache(tmp_path, dtype):
    body = token_body()
    batches = token_batches()
    full = extract_features(body, batches, pooling="mean", progress=False)
    feats = extract_features(body, batches, pooling="mean", dtype=dtype, cache=tmp_path, progress=False)
    assert feats.dtype == dtype and torch.equal(feats, full.to(dtype))  # the float32 features, rounded once
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["dtype"] == str(dtype).replace("torch.", "")
    assert sum(c["nbytes"] for c in man["chunks"]) < full.numel() * 2 + 1024  # half of float32's bytes
    probe = Probe(body, fail_at=0)
    again = extract_features(body, batches, pooling="mean", dtype=dtype, cache=tmp_path, progress=False)
    assert probe.calls == 0 and again.dtype == dtype and torch.equal(again, feats)


def test_bert_pairs_with_cache(tmp_path):
    body = bert_body()
    batches = token_batches(n=3, empty_row=False, labels=True)
    feats, labels = extract_features(body, batches, pooling="cls", cache=tmp_path, progress=False)
    assert torch.equal(labels, torch.cat([lab for _, lab in batches]))
    assert_close(feats, reference(body, batches, "cls"), torch.float32)
    probe = Probe(body, fail_at=0)
    again, _ = extract_features(body, batches, pooling="cls", cache=tmp_path, progress=False)
    assert probe.calls == 0 and torch.equal(again, feats)


def test_empty_data(tmp_path):
    feats = extract_features(token_body(), [], pooling="mean", cache=tmp_path, progress=False)
    assert feats.shape == (0, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_body_cpu_features(tmp_path):
    body = token_body()
    batches = token_batches()
    want = reference(body, batches, "mean")
    body.cuda()
    feats = extract_features(body, batches, pooling="mean", cache=tmp_path, progress=False)
    assert feats.device.type == "cpu"
    assert_close(feats, want, torch.float32)
