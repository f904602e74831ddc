"""Stage 3's factorization machine (paper Eq. 2, Rendle 2010) and its linear-probe baseline."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from refusalscope.stages.fm import (FactorizationMachine, FmConfig, csr_to_bags, evaluate_fm, fm_embeddings,
                                    fm_logits_reference, pairwise_reference, predict_proba, train_fm)
from refusalscope.stages.probe import evaluate_probe, train_probe

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
A, B = 3, 17  # the planted pair


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: one thread avoids OpenMP wake-ups that dominate on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_sparse(rows: int, cols: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < density)
    X[0] = 0.0  # an empty row: a bag with no non-zeros
    return sp.csr_matrix(X)


def xnor_data(seed: int, n: int = 400, d: int = 30) -> tuple[sp.csr_matrix, np.ndarray]:
    """Binary features, each on with probability 1/2; y = 1 iff x_a == x_b (XNOR), the others are distractors.

    XNOR = 1 − x_a − x_b + 2·x_a·x_b: the planted AND interaction x_a·x_b with linear terms that cancel its
    linear shadow, so y is independent of x_a alone and of x_b alone and no linear function of x gets more than
    3 of the 4 equally likely (x_a, x_b) cells right (a plain AND would be linearly separable). 400 rows rather
    than 200: with 120 training rows the FM also fits distractor pairs (test accuracy 0.68-0.88 over 5 seeds).
    """
    rng = np.random.default_rng(seed)
    X = (rng.random((n, d)) < 0.5).astype(np.float32)
    y = (X[:, A] == X[:, B]).astype(np.int64)
    return sp.csr_matrix(X), y


def splits(n: int):
    return slice(0, int(0.6 * n)), slice(int(0.6 * n), int(0.8 * n)), slice(int(0.8 * n), n)


XNOR_CFG = dict(k=8, lr=0.05, epochs=40, batch_size=32)


def cosines(V: torch.Tensor) -> torch.Tensor:
    Vn = V / V.norm(dim=1, keepdim=True)
    return Vn @ Vn.T


@pytest.mark.parametrize("k", [1, 3, 8])
def test_fast_pairwise_matches_double_sum(k):
    X = random_sparse(6, 12, 0.4, seed=k)
    model = FactorizationMachine(12, k, init_std=0.5, seed=k).double()
    with torch.no_grad():  # only the pairwise term: no bias, no linear weights
        model.table[:, k] = 0.0
    logits = model(*csr_to_bags(X, dtype=torch.float64))
    dense = torch.from_numpy(X.toarray())
    expected = torch.stack([pairwise_reference(model.V.detach(), dense[b]) for b in range(6)])
    assert expected.abs().max() > 0.1  # the check is not vacuous
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-12, atol=1e-12)
    assert logits[0] == 0.0  # the empty row


@pytest.mark.parametrize("k", [2, 5])
def test_logits_match_reference(k):
    X = random_sparse(7, 10, 0.5, seed=10 + k)
    model = FactorizationMachine(10, k, init_std=0.5, seed=k).double()
    with torch.no_grad():
        model.table[:, k] = torch.randn(10, dtype=torch.float64)
        model.bias.fill_(0.3)
    rows = [0, 2, 3, 6]  # a subset of rows, in csr_to_bags' row order
    got = model(*csr_to_bags(X, rows=rows, dtype=torch.float64)).detach()
    torch.testing.assert_close(got, fm_logits_reference(model, torch.from_numpy(X.toarray()[rows])),
                               rtol=1e-12, atol=1e-12)
    # float32 inputs through the public predict path agree too
    p = predict_proba(model, X[rows])
    np.testing.assert_allclose(p, torch.sigmoid(got).numpy(), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fm_finds_planted_interaction_probe_does_not(seed):
    """The FM fits XNOR and its embeddings single out the pair (a, b); the linear probe stays near chance.

    Asserted: cos(v_a, v_b) is the largest cosine among all pairs involving a or b, by a wide margin. Not asserted:
    that it is the largest over all pairs. Distractors are on half the time, so the FM can use them as a shared
    offset: their embeddings align with one another (distractor-distractor cosines reached 0.93-0.97 over 8 seeds,
    and 0.97-0.996 with weight decay), while cos(v_a, v_b) was 0.997-0.999, too thin a margin to rely on.
    """
    X, y = xnor_data(seed)
    tr, va, te = splits(X.shape[0])
    fit = train_fm(X[tr], y[tr], X[va], y[va], FmConfig(seed=seed, **XNOR_CFG), progress=False)
    fm = evaluate_fm(fit.model, X[te], y[te])
    assert fm["accuracy"] >= 0.95
    assert fm["auroc"] >= 0.95

    cos = cosines(fm_embeddings(fit.model))
    others = [j for j in range(X.shape[1]) if j not in (A, B)]
    partners = torch.cat([cos[A, others], cos[B, others]])
    assert cos[A, B] > 0.9
    assert cos[A, B] > partners.max() + 0.5

    probe = evaluate_probe(train_probe(X[tr], y[tr], X[va], y[va], seed=seed), X[te], y[te])
    assert probe["accuracy"] <= 0.8
    assert fm["accuracy"] - probe["accuracy"] >= 0.15


def test_same_seed_same_weights_and_other_seed_differs():
    X, y = xnor_data(5, n=200)
    tr, va, _ = splits(200)
    cfg = FmConfig(seed=3, k=4, lr=0.05, epochs=5, batch_size=16)
    a = train_fm(X[tr], y[tr], X[va], y[va], cfg, progress=False)
    b = train_fm(X[tr], y[tr], X[va], y[va], cfg, progress=False)
    c = train_fm(X[tr], y[tr], X[va], y[va], FmConfig(**{**cfg.__dict__, "seed": 4}), progress=False)
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), name
    assert a.history == b.history and a.best_epoch == b.best_epoch
    assert not torch.equal(a.model.table, c.model.table)


def test_best_epoch_state_is_returned():
    """The returned model is the best epoch's state (by val accuracy, ties: lower val loss), not the last one's."""
    X, y = xnor_data(1)
    tr, va, _ = splits(X.shape[0])
    cfg = FmConfig(seed=1, **XNOR_CFG)
    fit = train_fm(X[tr], y[tr], X[va], y[va], cfg, progress=False)
    h = fit.history
    assert len(h) == cfg.epochs and [e["epoch"] for e in h] == list(range(cfg.epochs))
    best = max(range(len(h)), key=lambda e: (h[e]["val_accuracy"], -h[e]["val_loss"]))
    assert fit.best_epoch == best
    assert fit.best_epoch < cfg.epochs - 1  # this seed peaks early, so the check below can tell the two apart
    assert fit.val_accuracy == h[best]["val_accuracy"]
    assert next(fit.model.parameters()).device.type == "cpu"
    # retraining for best_epoch + 1 epochs replays the same steps: its weights are the best epoch's state
    short = train_fm(X[tr], y[tr], X[va], y[va], FmConfig(**{**cfg.__dict__, "epochs": best + 1}), progress=False)
    assert torch.equal(short.model.table, fit.model.table)
    assert evaluate_fm(fit.model, X[va], y[va])["accuracy"] == pytest.approx(h[best]["val_accuracy"])


def test_one_class_auroc_is_nan():
    X, y = xnor_data(0, n=60)
    tr, va, _ = splits(60)
    fit = train_fm(X[tr], y[tr], X[va], y[va], FmConfig(epochs=1), progress=False)
    ones = np.ones(10, dtype=np.int64)
    assert np.isnan(evaluate_fm(fit.model, X[:10], ones)["auroc"])
    assert np.isnan(evaluate_probe(train_probe(X[tr], y[tr], X[va], y[va]), X[:10], ones)["auroc"])


def test_probe_recovers_planted_linear_feature():
    rng = np.random.default_rng(0)
    n, d, planted = 300, 40, 11
    X = rng.random((n, d)) * (rng.random((n, d)) < 0.5)
    y = (X[:, planted] + 0.05 * rng.standard_normal(n) > 0.25).astype(np.int64)
    X = sp.csr_matrix(X)
    tr, va, te = splits(n)
    fit = train_probe(X[tr], y[tr], X[va], y[va])
    assert fit.weights.shape == (d,)
    assert int(np.argmax(np.abs(fit.weights))) == planted
    assert fit.C in fit.grid and fit.val_accuracy == max(fit.grid.values())
    assert evaluate_probe(fit, X[te], y[te])["accuracy"] >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    X, y = xnor_data(0)
    tr, va, te = splits(X.shape[0])
    model = FactorizationMachine(X.shape[1], 4, init_std=0.3, seed=0)
    cpu = predict_proba(model, X, device="cpu")
    np.testing.assert_allclose(predict_proba(model, X, device="cuda"), cpu, rtol=1e-5, atol=1e-6)
    assert model.table.device.type == "cpu"
    fit = train_fm(X[tr], y[tr], X[va], y[va], FmConfig(device="cuda", **XNOR_CFG), progress=False)
    assert next(fit.model.parameters()).device.type == "cpu"
    assert evaluate_fm(fit.model, X[te], y[te], device="cuda")["accuracy"] >= 0.95


@pytest.mark.parametrize("mode", ["max", "positions"])
def test_benchmark_script_runs(tmp_path, monkeypatch, mode):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_fm", BENCHMARKS / "bench_fm.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_fm", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "fm.json"
    bench.main(["--columns", "2000", "--rows", "40", "--epochs", "1", "--layers", "4", "--l0", "5",
                "--mode", mode, "--probe", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["columns"] == (2000 * 4 if mode == "positions" else 2000)
    assert res["rows"] == 40 and res["nnz"] > 0
    for key in ("device", "mode", "seconds_total", "seconds_per_epoch", "peak_memory_mb"):
        assert key in res
