"""The pieces of multi-process training that need no second process (the launched run is in
tests/test_distributed_training.py)."""

from __future__ import annotations

import torch

from tune_train.distributed import DistributedForward, ignore_frozen_tensors, shard, training_view


class _Wrapper(torch.nn.Module):
    """Stands in for DDP: holds the model in ``.module`` and counts the calls it forwards."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_the_training_view_calls_through_the_wrapper_and_reads_the_plain_module():
    module = torch.nn.Linear(3, 2)
    module.config = {"in": 3}  # what families read (transformer.config)
    wrapper = _Wrapper(module)
    view = training_view(wrapper, module)
    assert isinstance(view, DistributedForward)
    out = view(torch.ones(1, 3))
    assert wrapper.calls == 1 and out.shape == (1, 2)
    assert view.config == {"in": 3}
    assert next(view.parameters()) is module.weight
    view.flag = True  # bookkeeping a family sets lands on the module, not on the view
    assert module.flag is True


def test_a_single_process_run_trains_the_module_itself():
    module = torch.nn.Linear(3, 2)
    assert training_view(module, module) is module


def test_ddp_ignores_exactly_the_frozen_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    count = ignore_frozen_tensors(model)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert {"0.weight", "0.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"} <= ignored
    assert not ignored & {"1.weight", "1.bias", "2.weight", "2.bias"}  # trained: synchronised
    assert count == len(ignored)


def test_shards_cover_every_item_once():
    items = list(range(11))
    shares = [shard(items, rank, 3) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == items
    assert shard(items, 0, 1) == items


AVERAGE_SCRIPT = """
import sys, torch
from accelerate import Accelerator
from tune_train.distributed import average_gradients

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
a.grad = torch.full((3,), float(rank + 1))        # 1 and 2: mean 1.5
b.grad = torch.arange(3.0) * (rank + 1)           # [0,1,2] and [0,2,4]: mean [0,1.5,3]
if rank == 1:
    c.grad = torch.full((3,), 4.0)                # no gradient on rank 0 counts as zero: mean 2
average_gradients([a, b, c], accelerator)
torch.save([a.grad, b.grad, c.grad], sys.argv[1] + f"/rank{rank}.pt")
# As the trainer does at its end: without tearing the gloo group down, a rank can exit while
# gloo's threads still run and abort with "terminate called without an active exception".
accelerator.end_training()
"""


def test_gradients_outside_ddp_are_averaged_over_processes(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "average.py"
    script.write_text(AVERAGE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = [torch.full((3,), 1.5), torch.tensor([0.0, 1.5, 3.0]), torch.full((3,), 2.0)]
    for rank in (0, 1):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected):
            torch.testing.assert_close(got, want)
