"""Aggregators against hand-computed means, and the LoRA exactness property of ffa / fedex."""
import numpy as np
import pytest
import torch

from dali_fl.engine.aggregate import RunningSum, aggregate, weighted_mean
from dali_fl.engine.federation import add_to_params_
from dali_fl.model.build import ModelSpec, build_model, load_state_, lora_pairs, trainable_state

TINY = dict(patch_size=4, depth=2, embed_dim=32, num_heads=2)


def test_weighted_mean_matches_hand_computation():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    b = {"w": torch.tensor([5.0, 6.0]), "b": torch.tensor(-1.0)}
    mean = weighted_mean([a, b], [3, 1])
    torch.testing.assert_close(mean["w"].float(), torch.tensor([2.0, 3.0]))  # (3*1+5)/4, (3*2+6)/4
    torch.testing.assert_close(mean["b"].float(), torch.tensor(2.0))  # (9-1)/4


def test_running_sum_equals_reference_on_random_states():
    rng = np.random.default_rng(0)
    states = [{"x": torch.from_numpy(rng.normal(size=(4, 3))).float(),
               "y": torch.from_numpy(rng.normal(size=5)).float()} for _ in range(5)]
    counts = [437, 1, 32, 33, 100]
    running = RunningSum()
    for s, n in zip(states, counts):
        running.add(s, n)
    got, deltas = aggregate(running, "fedavg")
    ref = weighted_mean(states, counts)
    assert deltas == {} and running.total == sum(counts)
    for k in ref:
        np.testing.assert_allclose(got[k].numpy(), ref[k].numpy(), rtol=1e-6, atol=1e-6)


def test_flat_round_trip_preserves_sums():
    running = RunningSum()
    running.add({"a": torch.ones(2, 2), "b": torch.arange(3.0)}, 4)
    flat = running.flat()
    other = RunningSum()
    other.add({"a": torch.zeros(2, 2), "b": torch.zeros(3)}, 1)
    other.load_flat(flat * 2)  # as if two identical processes were all-reduced
    assert other.total == 8
    torch.testing.assert_close(other.sums["a"], torch.full((2, 2), 8.0))


def _lora_model(freeze_a: bool):
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=TINY, pretrained=False, lora=True, lora_r=2,
                     lora_alpha=4, freeze_lora_a=freeze_a)
    return build_model(spec, num_classes=3, img_size=16, seed=0)


def _effective(model) -> dict:
    """Each adapted layer's effective weight W + scale * B @ A."""
    params = dict(model.named_parameters())
    return {p.base: params[p.base] + p.scale * params[p.b] @ params[p.a] for p in lora_pairs(model)}


def _clients(model, freeze_a: bool, gen: torch.Generator):
    """Two clients' trainable states: random B (and A unless frozen), as local training would leave."""
    init = {k: v.clone() for k, v in trainable_state(model).items()}
    out = []
    for _ in range(2):
        out.append({k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in init.items()})
    if freeze_a:
        assert not any(".lora_A." in k for k in init), "FFA must not exchange A"
    return out


@pytest.mark.parametrize("method,exact", [("ffa", True), ("fedex", True), ("fedit", False)])
@torch.no_grad()
def test_lora_aggregation_exactness(method, exact):
    model = _lora_model(freeze_a=method == "ffa")
    gen = torch.Generator().manual_seed(1)
    clients, weights = _clients(model, method == "ffa", gen), [3, 1]
    target = {}
    for state, w in zip(clients, weights):  # weighted average of the clients' effective weights
        load_state_(model, state)
        for k, v in _effective(model).items():
            target[k] = target.get(k, 0) + v * w / sum(weights)
    running = RunningSum(lora_pairs(model) if method == "fedex" else ())
    for state, n in zip(clients, weights):
        running.add(state, n)
    state, deltas = aggregate(running, method)
    load_state_(model, state)
    add_to_params_(model, deltas)
    err = max(float((_effective(model)[k] - target[k]).abs().max()) for k in target)
    if exact:
        assert err < 1e-5
    else:
        assert err > 1e-3  # FedIT's mean(B) mean(A) is not the mean of B A
