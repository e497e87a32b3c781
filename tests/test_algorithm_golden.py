"""Every algorithm combination keeps its results bitwise across refactors of the algorithm seam (issue 19).

`tests/golden/algorithms.json` was written by the code before the algorithms became one file each
(commit daf3d24, `DALI_FL_WRITE_GOLDEN=1 pytest tests/test_algorithm_golden.py`): per combination, a
sha256 of every checkpoint tensor (the model's trainable state and the server's state) and the
deterministic metrics of each round. The same runs today must give the same bytes and the same numbers.
The three DP combinations (dp-fedavg, dp-clip-only, fedlora-dp) were rewritten in issue 20, when DP began to
sample clients by Poisson sampling and to divide by the expected count; with `dp_sampling="fixed"` they still
give the old weights bitwise. shared-a's rows were rewritten three times, its weights never: round 2's
client_drift and update_spread when the drift began to be measured from the client's own B, where it starts;
round 2's personal_acc when it began to be measured with the B each client had just trained (it read the B of
the round before); and both rounds' upload_mb when B, which its clients keep, stopped being counted as sent.
fedex-mixed was rewritten when a lower-rank client began to start from the global effective weights (D_r in
its base weights); its round 1, where B is zero and so is D_r, is unchanged. dp-fedavg, fedlora-dp and
stack-mixed were rewritten when DP's noise and FLoRA's fresh adapters moved to tags above any client id
(seeds.TORCH_TAG): with tags 11 and 13 they were the torch streams clients 11 and 13 train with.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.tiny import tiny_config, tiny_store

GOLDEN = Path(__file__).parent / "golden" / "algorithms.json"
# Wall-clock figures differ run to run; everything else in a metrics row is a function of the seed.
TIMED = {"round_time_s", "data_wait_s", "compute_s", "aggregate_s", "images_per_s", "peak_gpu_mem_mb", "eval_s"}
SGD = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0}
LORA = {"alg": "fedlora", "lora_r": 2, "lr": 5e-3}
MIXED = {**LORA, "lora_r": 8, "lora_ranks": "1,2,4"}  # lora_r at its default: --lora-ranks takes its place
COMBOS: dict[str, dict] = {
    "fedavg-adamw": {},
    "fedavg-sgd-heavy-ball": {"optimizer": "sgd", "lr": 0.05},
    "fedprox": {**SGD, "prox_mu": 0.1},
    "fedadam": {**SGD, "server_opt": "adam", "server_lr": 0.01},
    "fedyogi": {**SGD, "server_opt": "yogi", "server_lr": 0.01},
    "fedadagrad": {**SGD, "server_opt": "adagrad", "server_lr": 0.01},
    "fedavgm": {**SGD, "server_opt": "momentum"},
    "server-sgd": {**SGD, "server_opt": "sgd", "server_lr": 0.5},
    "scaffold": {**SGD, "scaffold": True, "frac": 1.0},
    "dp-fedavg": {**SGD, "dp_clip": 0.5, "dp_noise": 0.3},
    "dp-clip-only": {**SGD, "dp_clip": 0.5},
    "fedit": LORA,
    "ffa": {**LORA, "lora_agg": "ffa"},
    "fedex": {**LORA, "lora_agg": "fedex"},
    "fedex-fedadam": {**LORA, "lora_agg": "fedex", "server_opt": "adam", "server_lr": 0.01},
    "fedit-prox": {**LORA, "prox_mu": 0.1},
    "fedlora-scaffold": {**LORA, **SGD, "scaffold": True},
    "fedlora-dp": {**LORA, "dp_clip": 0.5, "dp_noise": 0.3},
    "zero-pad-mixed": {**MIXED, "lora_agg": "zero-pad"},
    "fedex-mixed": {**MIXED, "lora_agg": "fedex"},
    "stack-mixed": {**MIXED, "lora_agg": "stack"},
    "shared-a": {**LORA, "lora_agg": "shared-a"},
}


def fingerprint(run_dir: Path) -> dict:
    """sha256 of each checkpoint tensor, and each round's metrics without its timings."""
    tensors = load_file(str(run_dir / "checkpoint" / "state.safetensors"))
    hashes = {name: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:20]
              for name, t in sorted(tensors.items())}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"tensors": hashes, "rows": [{k: v for k, v in r.items() if k not in TIMED} for r in rows]}


def train_combo(store: Path, out: Path, options: dict) -> dict:
    """Two rounds of the tiny federation with `options` on top; its fingerprint."""
    from dali_fl.engine.run import train

    train(tiny_config(store, rounds=2, local_bs=25, **options), out, progress=False)
    return fingerprint(out)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("golden-store"))


@pytest.mark.skipif(not GOLDEN.exists() and not os.environ.get("DALI_FL_WRITE_GOLDEN"),
                    reason="no golden file (DALI_FL_WRITE_GOLDEN=1 writes it)")
@pytest.mark.parametrize("name", sorted(COMBOS))
def test_combination_matches_the_code_before_the_seam(name, store, tmp_path):
    got = train_combo(store, tmp_path / name, COMBOS[name])
    if os.environ.get("DALI_FL_WRITE_GOLDEN"):
        doc = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        doc[name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        return
    want = json.loads(GOLDEN.read_text())[name]
    changed = sorted(k for k in set(want["tensors"]) | set(got["tensors"])
                     if want["tensors"].get(k) != got["tensors"].get(k))
    assert not changed, f"{name}: tensors differ from the golden run: {changed[:5]}"
    # Rows may gain columns (the simulated clock's sim_time_s, ...); the golden ones must keep their values.
    assert [{k: g.get(k) for k in w} for g, w in zip(got["rows"], want["rows"])] == want["rows"]
    assert len(got["rows"]) == len(want["rows"])
