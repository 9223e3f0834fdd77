"""EMA of the trained parameters against the closed-form average, and its state round trip."""

from __future__ import annotations

import pytest
import torch

from tune_train.ema import EMA


def _closed_form(decay: float, start: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    # ema_N = d^N * w_0 + sum_k (1 - d) * d^(N - k) * w_k
    n = len(values)
    out = decay**n * start
    for k, value in enumerate(values, start=1):
        out = out + (1 - decay) * decay ** (n - k) * value
    return out


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("on_storage", [True, False])
def test_ema_equals_the_closed_form_average_after_n_updates(foreach, on_storage):
    module = torch.nn.Linear(3, 2)
    params = list(module.parameters())
    start = [p.detach().clone() for p in params]
    ema = EMA(params, decay=0.9, foreach=foreach, update_on_storage=on_storage)
    seen: list[list[torch.Tensor]] = [[] for _ in params]
    for step in range(1, 6):
        with torch.no_grad():
            for i, p in enumerate(params):
                p.add_(float(step))  # a "training step" that moves every weight
                seen[i].append(p.detach().clone())
        assert ema.step(step)
    for i in range(len(params)):
        assert torch.allclose(ema.shadow[i], _closed_form(0.9, start[i], seen[i]), atol=1e-6)
    assert ema.num_updates == 5


def test_a_big_ema_updates_a_chunk_at_a_time_with_the_same_result(monkeypatch):
    """A full model's EMA moves and converts a chunk of tensors at a time (bounded extra memory);
    the average is the same as in one go, bf16 weights included."""
    import tune_train.ema as ema_module

    params = [torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16)) for _ in range(7)]
    whole = EMA(params, decay=0.8)
    monkeypatch.setattr(ema_module, "CHUNK_BYTES", 3 * 64 * 64 * 4 - 1)  # three tensors a chunk
    chunked = EMA(params, decay=0.8)
    assert list(chunked._chunks()) == [(0, 3), (3, 6), (6, 7)]
    for step in range(1, 4):
        with torch.no_grad():
            for p in params:
                p.add_(0.5)
        chunked.step(step)
        monkeypatch.setattr(ema_module, "CHUNK_BYTES", 2**40)
        assert list(whole._chunks()) == [(0, 7)]
        whole.step(step)
        monkeypatch.setattr(ema_module, "CHUNK_BYTES", 3 * 64 * 64 * 4 - 1)
    for a, b in zip(chunked.shadow, whole.shadow):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_update_interval_skips_steps_and_swapped_in_restores_the_trained_weights():
    weight = torch.nn.Parameter(torch.zeros(2))
    ema = EMA([weight], decay=0.5, update_interval=2)
    with torch.no_grad():
        weight.fill_(4.0)
    assert not ema.step(1) and torch.equal(ema.shadow[0], torch.zeros(2))
    assert ema.step(2) and torch.equal(ema.shadow[0], torch.full((2,), 2.0))
    with ema.swapped_in():
        assert torch.equal(weight.detach(), torch.full((2,), 2.0))
    assert torch.equal(weight.detach(), torch.full((2,), 4.0))


def test_state_dict_round_trips_and_a_mismatch_is_refused():
    weight = torch.nn.Parameter(torch.ones(3))
    ema = EMA([weight], decay=0.9)
    with torch.no_grad():
        weight.fill_(2.0)
    ema.step(1)
    other = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.num_updates == 1
    with pytest.raises(ValueError, match="does not match"):
        EMA([torch.nn.Parameter(torch.zeros(4))], decay=0.9).load_state_dict(ema.state_dict())
