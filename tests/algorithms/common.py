"""What the algorithm tests share: the tiny runs' options, one round, a CLI run, refusals, stand-ins, LoRA checks."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file

import dali_fl.engine.federation as fed
from dali_fl.algorithms.base import ServerRound
from dali_fl.config import TrainConfig
from dali_fl.engine.run import prepare
from dali_fl.model.build import trainable_state
from tests.tiny import tiny_args, tiny_config

# The tiny federation (4 clients, half of them a round) as `dali-fl train` flags ...
ARGS = tiny_args(local_bs=25, lr=2e-3)
# ... and the mixed-rank one: 3 clients, all of them every round, FedLoRA.
RANK_ARGS = tiny_args(num_users=3, frac=1, alg="fedlora", lr=5e-3)
# SCAFFOLD's plain SGD steps.
SCAFFOLD = ("--scaffold", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0")


def config(store: Path, **options: Any) -> TrainConfig:
    """The tiny federation's config (`ARGS`), with `options` on top."""
    lora = {"lora_r": 2} if options.get("alg") == "fedlora" else {}  # FedAvg refuses LoRA options it would ignore
    return tiny_config(store, **{**lora, "local_bs": 25, "lr": 2e-3, **options})


def rank_config(store: Path, **options: Any) -> TrainConfig:
    """The mixed-rank federation's config (ranks 2, 4, 8 unless `options` say otherwise)."""
    return tiny_config(store, **{"num_users": 3, "frac": 1.0, "alg": "fedlora", "local_bs": 25, "lr": 5e-3,
                                 "lora_ranks": "2,4,8", **options})


def one_round(store: Path, tmp_path: Path, name: str, **options: Any) -> dict[str, torch.Tensor]:
    """The trainable state after one round of the tiny federation with `options`."""
    fx, _ = prepare(config(store, **options), tmp_path / name, resume=False, write=False)
    fed.run_round(fx, 1)
    state = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    fx.close()
    return state


def train_cli(invoke, store: Path, out: Path, *extra: Any) -> None:
    """`dali-fl train` on the tiny federation with `extra` flags; it must succeed."""
    result = invoke("train", "--store", store, "--out", out, *ARGS, *extra)
    assert result.exit_code == 0, (result.output, result.exception)


def resumed_pair(invoke, store: Path, tmp_path: Path, *extra: Any) -> tuple[dict, dict]:
    """Checkpoints of a 3-round run and of a 1-round run resumed to 3, with the same options."""
    train_cli(invoke, store, tmp_path / "full", "--rounds", "3", *extra)
    train_cli(invoke, store, tmp_path / "half", "--rounds", "1", *extra)
    assert invoke("train", "--resume", tmp_path / "half", "--rounds", "3", "--quiet").exit_code == 0
    return (load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors")),
            load_file(str(tmp_path / "half" / "checkpoint" / "state.safetensors")))


def assert_refused(invoke, assert_user_error, store: Path, out: Path, base: list[str], args, words) -> None:
    """`dali-fl train` with `args` on top of `base` is one `error:` line naming `words`, and creates no run."""
    assert_user_error(invoke("train", "--store", store, "--out", out, *base, *args), *words)
    assert not out.exists()


def server_round(start: dict[str, torch.Tensor], round_: int = 1, num_clients: int = 1,
                 total: float = 1.0) -> ServerRound:
    """What an algorithm's server hooks see, for calling them without a Federation."""
    return ServerRound(round_, num_clients, start, total, {})


def stand_in(cfg: TrainConfig, **fields: Any) -> SimpleNamespace:
    """A Federation stand-in with what an algorithm's constructor reads: `cfg`, `device`, and `fields`."""
    return SimpleNamespace(cfg=cfg, device=torch.device("cpu"), **fields)


def model_of(**tensors: torch.Tensor) -> torch.nn.Module:
    """A module whose trainable parameters are `tensors`, in the order given."""
    model = torch.nn.Module()
    for name, t in tensors.items():
        model.register_parameter(name, torch.nn.Parameter(t.clone()))
    return model


# --- LoRA aggregations --------------------------------------------------------------------------

def lora_aggregation_error(method: str) -> float:
    """Two clients of one rank aggregated by `--lora-agg method`: the largest gap between the global
    effective weights W + s·B@A and the clients' weighted average of theirs."""
    from dali_fl.algorithms import REGISTRY
    from dali_fl.engine.aggregate import RunningSum, mean_of
    from dali_fl.engine.federation import add_to_params_
    from dali_fl.model.build import ModelSpec, build_model, load_state_
    from dali_fl.model.lora import lora_pairs

    freeze_a = REGISTRY[method].freezes_lora_a
    spec = ModelSpec(name="vit_tiny_patch16_224", kwargs=dict(patch_size=4, depth=2, embed_dim=32, num_heads=2),
                     pretrained=False, lora=True, lora_r=2, lora_alpha=4, freeze_lora_a=freeze_a)
    model = build_model(spec, num_classes=3, img_size=16, seed=0)
    pairs = lora_pairs(model)

    def effective() -> dict:
        params = dict(model.named_parameters())
        return {p.base: params[p.base] + p.scale * params[p.b] @ params[p.a] for p in pairs}

    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        init = {k: v.clone() for k, v in trainable_state(model).items()}
        if freeze_a:
            assert not any(".lora_A." in k for k in init), "FFA must not exchange A"
        # Two clients' trainable states: random B (and A unless frozen), as local training would leave.
        clients = [{k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in init.items()} for _ in range(2)]
        weights = [3, 1]
        target: dict = {}
        for state, w in zip(clients, weights):  # weighted average of the clients' effective weights
            load_state_(model, state)
            for k, v in effective().items():
                target[k] = target.get(k, 0) + v * w / sum(weights)
        cls = REGISTRY[method]
        running = RunningSum(pairs if cls.needs_products else ())
        for state, n in zip(clients, weights):
            running.add(state, n)
        mean = mean_of(running)
        products = {k: v / running.total for k, v in running.products.items()}
        aggregation = cls(stand_in(TrainConfig(), model=model, pairs=pairs))
        state, deltas = aggregation.aggregate(server_round(init, num_clients=2, total=running.total), mean, {},
                                              products)
        load_state_(model, state)
        add_to_params_(model, deltas)
        return max(float((effective()[k] - target[k]).abs().max()) for k in target)


def effective_weights(fx) -> dict[str, torch.Tensor]:
    """base + scale * B @ A per adapted layer, at the scale the model holds now."""
    from peft.tuners.lora import LoraLayer

    params = dict(fx.model.named_parameters())
    scales = {f"{n}.base_layer.weight": m.scaling["default"] for n, m in fx.model.named_modules()
              if isinstance(m, LoraLayer)}
    return {p.base: (params[p.base] + scales[p.base] * params[p.b] @ params[p.a]).detach().clone()
            for p in fx.pairs}


def round_against_the_exact_average(store: Path, tmp_path: Path, monkeypatch, agg: str):
    """One round of clients with ranks 2, 4, 8 under `--lora-agg agg`.

    Returns (global effective weights, the exact average of the clients', the clients, the closed Federation).
    """
    fx, _ = prepare(rank_config(store, lora_agg=agg), tmp_path / agg, resume=False, write=False)
    clients, real = [], fed.local_train

    def recording(model, loader, indices, *args):
        res = real(model, loader, indices, *args)
        clients.append((effective_weights(fx), res.num_samples,
                        {n: v.clone() for n, v in trainable_state(model).items()}))
        return res

    monkeypatch.setattr(fed, "local_train", recording)
    fed.run_round(fx, 1)
    total = sum(n for _, n, _ in clients)
    exact = {k: sum(eff[k] * n for eff, n, _ in clients) / total for k in clients[0][0]}
    got = effective_weights(fx)
    fx.close()
    return got, exact, clients, fx
