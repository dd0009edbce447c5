"""tltorch.reuse_memory (tltorch/_heap.py): freed memory kept for reuse inside the block, handed back after.

Measured in fresh processes (malloc's state is the process's): page faults (ru_minflt) of a loop that
allocates and fills a 48 MB tensor, inside and outside the block, and the resident size after the block.
"""
import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tltorch
import tltorch._heap as heap
import tltorch.extract as extract_mod

GLIBC = heap._libc() is not None
# AddressSanitizer's allocator replaces malloc (and keeps freed memory in its quarantine); a user's own
# malloc settings or allocator turn reuse_memory off
MALLOC = pytest.mark.skipif(not GLIBC or heap._configured() or os.environ.get("TLTORCH_SANITIZED") == "1",
                            reason="glibc's malloc, as it comes, only")

_LOOP = textwrap.dedent("""
    import resource, sys, torch
    import tltorch
    torch.set_num_threads(1)
    def faults(n=8):
        torch.empty(12 << 20).fill_(1.0)  # the first allocation may fault in any case
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            torch.empty(12 << 20).fill_(1.0)  # 48 MB, freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 >> 20
""")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", _LOOP + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@MALLOC
def test_reuse_removes_page_faults():
    plain, reused, ok = _run("""
        plain = faults()
        with tltorch.reuse_memory() as ok:
            reused = faults()
        print(plain, reused, ok)
    """)
    pages = (48 << 20) // 4096
    assert ok == "True"
    if int(plain) < 2 * pages:  # transparent huge pages: a fault maps 2 MB, and fresh memory is cheap
        pytest.skip(f"{plain} faults for eight fresh 48 MB tensors: not a fault per 4 KB page here")
    assert int(reused) * 4 <= int(plain)  # reused: a fraction of the faults (here 0-2% of them)


@MALLOC
def test_memory_handed_back_after():
    before, inside, after = map(int, _run("""
        before = rss()
        with tltorch.reuse_memory():
            held = [torch.ones(32 << 20) for _ in range(3)]  # 384 MB
            del held[:]
            inside = rss()
        print(before, inside, rss())
    """))
    assert inside >= before + 300  # kept while in the block
    assert after <= before + 64  # trimmed on the way out


@MALLOC
def test_nested():
    with tltorch.reuse_memory() as a:
        with tltorch.reuse_memory() as b:
            assert heap._depth == 2
        assert heap._depth == 1 and a is b is True
    assert heap._depth == 0


@pytest.mark.parametrize("env", [("MALLOC_TRIM_THRESHOLD_", "1000000"), ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1"),
                                 ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_leaves_configured_malloc_alone(env, monkeypatch):
    monkeypatch.setenv(*env)
    calls = []
    monkeypatch.setattr(heap, "_libc", lambda: (lambda *a: calls.append(a) or 1, lambda n: 0))
    with tltorch.reuse_memory() as ok:
        assert ok is False
    assert calls == []


def test_no_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_libc", lambda: None)
    with tltorch.reuse_memory() as ok:
        assert ok is False
    with pytest.raises(RuntimeError, match="boom"):
        with tltorch.reuse_memory():
            raise RuntimeError("boom")
    assert heap._depth == 0


def test_extract_features_uses_it(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def spy():
        entered.append(heap._depth)
        yield True

    monkeypatch.setattr(extract_mod, "reuse_memory", spy)
    body = torch.nn.Linear(4, 3)
    feats = tltorch.extract_features(body, torch.randn(10, 4), batch_size=4, progress=False)
    assert entered == [0] and feats.shape == (10, 3)
