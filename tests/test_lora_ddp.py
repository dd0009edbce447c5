"""LoRA under DistributedDataParallel: 2 CPU processes (gloo), different data on each rank. After a few
steps the adapters are identical on both ranks and equal to one process trained on the whole batch."""
import torch
from torch import nn

import tltorch
from conftest import run_ranks

WORLD, STEPS, ROWS = 2, 3, 6  # ROWS per rank


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    # init_lora_weights=False: nonzero lora_B, so lora_A gets a gradient from the first step
    return tltorch.add_lora(model, tltorch.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"],
                                                      init_lora_weights=False))


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * ROWS, 10, generator=g), torch.randn(WORLD * ROWS, 4, generator=g))
            for _ in range(STEPS)]


def train(model, data):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def worker(rank):
    model = nn.parallel.DistributedDataParallel(make_model())
    data = [(x[rank * ROWS:(rank + 1) * ROWS], y[rank * ROWS:(rank + 1) * ROWS]) for x, y in batches()]
    train(model, data)
    return lora_state(model.module)


def test_ddp_matches_single_process(tmp_path):
    ranks = run_ranks(worker, WORLD, tmp_path)

    single = make_model()
    start = lora_state(single)
    train(single, batches())  # the whole batch: DDP's gradient average is this batch's mean
    want = lora_state(single)

    assert ranks[0].keys() == want.keys() and len(want) == 6
    for k in want:
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][k], want[k], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(want[k], start[k])
