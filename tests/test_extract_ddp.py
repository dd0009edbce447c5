"""extract_features under torch.distributed: 2 CPU processes (gloo). Each rank runs the body on its share
of the batches (i % 2 == rank), the cache ends up holding all of them under one manifest, and every rank
returns every feature and label in order: equal to one process's features. An interrupted run resumes
where each rank stopped, a rerun on both ranks runs nothing, and a single process then reads the whole
matrix from the same cache."""
import json
import os

import torch

from conftest import run_ranks
from test_extract import NB, Probe, cache_files, token_batches, token_body
from tltorch.extract import extract_features

WORLD, KEPT = 2, 4


def worker(rank, out_dir):
    body, batches = token_body(), token_batches(labels=True)
    cache = os.path.join(out_dir, "cache")
    probe = Probe(body)

    def interrupted():  # both ranks stop after batch KEPT - 1: each has done its share of those
        yield from batches[:KEPT]
        raise KeyError("data failed")
    try:
        extract_features(body, interrupted(), pooling="mean", cache=cache, progress=False)
    except KeyError:
        pass
    calls = [probe.calls]
    first = extract_features(body, batches, pooling="mean", cache=cache, progress=False)
    calls.append(probe.calls - sum(calls))
    again = extract_features(body, batches, pooling="mean", cache=cache, progress=False)
    calls.append(probe.calls - sum(calls))
    uncached = extract_features(body, batches, pooling="mean", progress=False)
    calls.append(probe.calls - sum(calls))
    return {"first": first, "again": again, "uncached": uncached, "calls": calls}


def test_ranks_share_the_batches_and_the_cache(tmp_path):
    ranks = run_ranks(worker, WORLD, tmp_path, str(tmp_path))

    body, batches = token_body(), token_batches(labels=True)
    want, want_labels = extract_features(body, batches, pooling="mean", progress=False)
    for r, got in enumerate(ranks):
        share = len(range(r, NB, WORLD))  # NB = 6 batches: 3 each
        done = len(range(r, KEPT, WORLD))
        assert got["calls"] == [done, share - done, 0, share], (r, got["calls"])
        for key in ("first", "again", "uncached"):
            feats, labels = got[key]
            torch.testing.assert_close(feats, want, rtol=1e-6, atol=1e-6)
            assert torch.equal(labels, want_labels)
            assert torch.equal(feats, ranks[0]["first"][0])

    cache = tmp_path / "cache"
    man = json.loads((cache / "manifest.json").read_text())
    assert man["complete"] and man["num_batches"] == NB
    _, files, recorded = cache_files(cache)
    assert files == recorded
    # each rank wrote chunks of its own batches only; together they are every batch once
    owner = [{b[0] % WORLD for b in c["batches"]} for c in man["chunks"]]
    assert all(len(o) == 1 for o in owner) and set.union(*owner) == set(range(WORLD))
    assert sorted(b[0] for c in man["chunks"] for b in c["batches"]) == list(range(NB))

    probe = Probe(body, fail_at=0)  # one process reads what both ranks wrote
    feats, labels = extract_features(body, batches, pooling="mean", cache=cache, progress=False)
    assert probe.calls == 0
    assert torch.equal(feats, ranks[0]["first"][0]) and torch.equal(labels, want_labels)
