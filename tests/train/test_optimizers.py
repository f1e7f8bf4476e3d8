"""The optimizers against PyTorch's own, on the same sparse gradients (needs torch)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from embkv.train import SGD, Adagrad, Adam, Optimizer, sum_duplicates

torch = pytest.importorskip("torch")

N, DIM, STEPS = 60, 8, 40


def _run(ours: Optimizer, theirs: type, kwargs: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(N, DIM)).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = theirs([param], **kwargs)
    w, state = w0.copy(), ours.initial_state(N, DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note about sparse invariant checks
        for step in range(1, STEPS + 1):
            ids = rng.permutation(N)[: N // 2]  # distinct ids: the summing of duplicates is tested apart
            grads = rng.normal(size=(len(ids), DIM)).astype(np.float32)
            param.grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None], torch.from_numpy(grads),
                                                 (N, DIM)).coalesce()
            opt.step()
            rows, st = w[ids], state[ids]
            ours.update(rows, st, grads, step)
            w[ids], state[ids] = rows, st
    return w, param.detach().numpy()


def test_sgd_is_bit_identical_to_torch():
    ours, theirs = _run(SGD(lr=0.1), torch.optim.SGD, {"lr": 0.1})
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), [
    (Adagrad(lr=0.05, initial_accumulator_value=0.1), torch.optim.Adagrad,
     {"lr": 0.05, "initial_accumulator_value": 0.1}),
    (Adagrad(lr=0.5, eps=1e-6), torch.optim.Adagrad, {"lr": 0.5, "eps": 1e-6}),
    (Adam(lr=0.01), torch.optim.SparseAdam, {"lr": 0.01}),
    (Adam(lr=0.003, betas=(0.8, 0.99), eps=1e-6), torch.optim.SparseAdam,
     {"lr": 0.003, "betas": (0.8, 0.99), "eps": 1e-6}),
], ids=["adagrad", "adagrad-eps", "adam", "adam-betas"])
def test_adagrad_and_adam_match_torch_to_float32_rounding(ours, theirs, kwargs):
    """Not bit for bit: torch's vectorized CPU sqrt is not always correctly rounded (numpy's is)."""
    got, want = _run(ours, theirs, kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # a few ulps of weights near 1


def test_duplicate_ids_in_a_push_are_summed_first():
    ids = np.array([3, 1, 3, 3, 2])
    grads = np.arange(5 * DIM, dtype=np.float32).reshape(5, DIM)
    uniq, summed = sum_duplicates(ids, grads)
    assert uniq.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(summed, [grads[1], grads[4], grads[0] + grads[2] + grads[3]])
