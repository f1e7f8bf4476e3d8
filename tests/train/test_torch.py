"""embkv.torch: Embedding and EmbeddingBag backed by training tables, in real PyTorch loops."""

from __future__ import annotations

import numpy as np
import pytest

from embkv.train import SGD, Adagrad, TrainingTable

torch = pytest.importorskip("torch")
et = pytest.importorskip("embkv.torch")

DIM = 4


@pytest.fixture
def table(store):
    t = TrainingTable(store, "emb", DIM, SGD(lr=1.0), init_std=0.0)
    yield t
    t.close()


def test_embedding_forward_shape_and_backward_pushes_the_gradient(table):
    emb = et.Embedding(table)
    out = emb(torch.tensor([[1, 2], [2, 3]]))
    assert out.shape == (2, 2, DIM) and out.dtype == torch.float32
    out.sum().backward()  # the hook pushes: row 2 appears twice, its gradients are summed
    np.testing.assert_array_equal(table.get([1, 2, 3])[0][:, 0], [-1, -2, -1])
    assert table.stats()["pushes"] == 1


def test_eval_mode_reads_without_pinning(store):
    t = TrainingTable(store, "e", DIM, SGD(lr=1.0), staleness=0)
    try:
        emb = et.Embedding(t).eval()
        for _ in range(3):  # would hit the staleness bound if each forward pinned
            emb(torch.tensor([7]))
        with torch.no_grad():
            et.Embedding(t)(torch.tensor([7]))
        t.pull([7], block=False)
    finally:
        t.close()


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_matches_torch(table, mode):
    weights = np.random.default_rng(0).normal(size=(10, DIM)).astype(np.float32)
    table.push_rows(np.arange(10), weights)
    ours = et.EmbeddingBag(table, mode=mode)
    theirs = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(weights.copy()), mode=mode, freeze=False)
    bags = torch.tensor([[1, 2, 2], [3, 4, 9]])
    flat, offsets = torch.tensor([1, 2, 5, 5, 5, 0]), torch.tensor([0, 2])
    for args in ((bags,), (flat, offsets)):
        a, b = ours(*args), theirs(*args)
        torch.testing.assert_close(a, b)
        grad = torch.randn_like(a)
        a.backward(grad)
        b.backward(grad)
        with torch.no_grad():
            theirs.weight -= theirs.weight.grad  # SGD lr=1 on the dense gradient torch computes
        theirs.weight.grad = None
    np.testing.assert_allclose(table.get(np.arange(10))[0], theirs.weight.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_deferred_push_with_step(store):
    table = TrainingTable(store, "d", DIM, SGD(lr=1.0), init_std=0.0, staleness=1)  # two forwards, then a step
    emb = et.Embedding(table, push_on_backward=False)
    emb(torch.tensor([1])).sum().backward()
    emb(torch.tensor([1])).sum().backward()  # two backward passes, one step
    assert table.get([1])[0][0, 0] == 0
    emb(torch.tensor([5]))  # a forward without backward: released at step
    emb.step()
    np.testing.assert_array_equal(table.get([1])[0][0], [-2] * DIM)
    table.pull([5], block=False)
    table.pull([5], block=False)  # released by step: two pulls fit the bound again
    table.close()


def test_a_two_tower_model_trains_with_torch_optim_and_a_dataloader(store):
    users = TrainingTable(store, "users", 8, Adagrad(lr=0.2), init_std=0.1, seed=1)
    items = TrainingTable(store, "items", 8, Adagrad(lr=0.2), init_std=0.1, seed=2)
    try:
        rng = np.random.default_rng(0)
        n_users, n_items = 200, 100
        user_group, item_group = rng.integers(0, 2, n_users), rng.integers(0, 2, n_items)
        u = rng.integers(0, n_users, 4000)
        i = rng.integers(0, n_items, 4000)
        y = (user_group[u] == item_group[i]).astype(np.float32)  # a planted structure
        data = torch.utils.data.TensorDataset(torch.from_numpy(u), torch.from_numpy(i), torch.from_numpy(y))
        loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(0))
        user_emb, item_emb = et.Embedding(users), et.Embedding(items)
        bias = torch.nn.Parameter(torch.zeros(1))
        dense = torch.optim.SGD([bias], lr=0.1)
        losses = []
        for _epoch in range(4):
            total = 0.0
            for bu, bi, by in et.prefetching(loader, {user_emb: lambda b: b[0], item_emb: lambda b: b[1]}):
                logits = (user_emb(bu) * item_emb(bi)).sum(-1) + bias
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, by)
                dense.zero_grad()
                loss.backward()
                dense.step()
                total += float(loss.detach()) * len(by)
            losses.append(total / len(data))
        assert losses[-1] < 0.5 * losses[0], losses
        assert users.stats()["prefetched"] > 0 or users.stats()["hits"] > 0
    finally:
        users.close()
        items.close()
