"""The Flower app: run config <-> options, the wire, refusals before any round, and equality with dali-fl's engine."""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("flwr")

try:
    import tomllib
except ImportError:  # Python 3.10: flwr brings tomli
    import tomli as tomllib

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from dali_fl.config import TrainConfig  # noqa: E402
from dali_fl.data.sources import load_synthetic  # noqa: E402
from dali_fl.data.store import write_store  # noqa: E402
from dali_fl.engine.run import train  # noqa: E402
from dali_fl.engine.rundir import BASE_PREFIX, read_metrics  # noqa: E402
from dali_fl.errors import DaliFlError  # noqa: E402
from dali_fl.flower.app import server_app, simulate  # noqa: E402
from dali_fl.flower.options import (  # noqa: E402
    COMPONENTS,
    app_toml,
    config_from_run_config,
    options_from_run_config,
    run_config_from_options,
)
from dali_fl.flower.wire import at_rank, from_record, pad_like, to_record  # noqa: E402
from dali_fl.model.build import build_model, trainable_state  # noqa: E402
from dali_fl.model.lora import lora_pairs  # noqa: E402

TINY = dict(model="vit_tiny_patch16_224", model_kwargs="patch_size=4,depth=1,embed_dim=32,num_heads=2",
            pretrained=False, num_users=4, frac=0.5, partition="iid", local_bs=25, rounds=2, lr=2e-3,
            device="cpu")  # the default loader: dali, on the CPU
FLAGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4,depth=1,embed_dim=32,num_heads=2",
         "--no-pretrained", "--num-users", "4", "--frac", "0.5", "--partition", "iid", "--rounds", "2",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path, _ = write_store(load_synthetic(200, 50, seed=0), tmp_path_factory.mktemp("stores"), 16, progress=False)
    return path


def test_the_run_config_is_every_train_option_and_builds_the_same_config(store, tmp_path):
    options = {**TINY, "store": str(store), "alg": "fedlora", "lora_r": 2, "lora_agg": "fedex", "server_opt": "adam",
               "server_betas": (0.8, 0.95), "resize_to": None}
    run_config = run_config_from_options(options, tmp_path / "run")
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())  # what Flower can carry
    assert "async" in run_config and not [k for k in run_config if k.endswith("-")]  # --async, not `async-`
    assert options_from_run_config({"async": True, "async-": True})[0] == {"async_": True}  # an older app's too
    cfg, out = config_from_run_config(run_config)
    assert cfg.to_json() == TrainConfig.from_options(options).to_json() and out == tmp_path / "run"
    doc = tomllib.loads(app_toml(run_config))
    assert doc["tool"]["flwr"]["app"]["config"] == run_config
    assert doc["tool"]["flwr"]["app"]["components"] == COMPONENTS
    assert doc["project"]["dependencies"] == []  # flwr would otherwise install them into a fresh environment
    module, attr = COMPONENTS["serverapp"].split(":")
    assert isinstance(getattr(importlib.import_module(module), attr), ServerApp)
    module, attr = COMPONENTS["clientapp"].split(":")
    assert isinstance(getattr(importlib.import_module(module), attr), ClientApp)


@pytest.mark.parametrize("bad", [dict(frac=0), dict(lora_agg="fedavg"), dict(alg="fedavg", lora_ranks="2,4"),
                                 dict(server_lr=0.5), dict(server_betas="0.9,x", server_opt="adam"),
                                 dict(scaffold=True, optimizer="sgd", momentum=0.0),
                                 dict(alg="fedlora", lora_agg="shared-a"), dict(alg="fedlora", lora_agg="fedsa"),
                                 dict(alg="fedavg", lora_r=4), dict(lora_targets="qkv,proj")])
def test_a_refused_config_stops_before_any_round_in_train_s_words(store, tmp_path, monkeypatch, bad):
    options = {**TINY, "store": str(store), **bad}
    run_config = run_config_from_options(options, tmp_path / "run")
    if "scaffold" in bad or "lora_agg" in bad and bad["lora_agg"] != "fedavg":  # dali-fl runs them; Flower refuses
        flag = "--scaffold" if "scaffold" in bad else "--lora-agg shared-a"
        want = f"{flag} keeps per-client state in one process's file; the Flower app does not run it"
    else:
        with pytest.raises(DaliFlError) as refused:
            TrainConfig.from_options(options)
        want = str(refused.value)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(DaliFlError) as got:  # `flwr run`: the ServerApp touches no grid (an object() here)
        server_app(object(), context)
    assert str(got.value).startswith(want) and "\n" not in str(got.value)
    monkeypatch.setattr("flwr.simulation.run_simulation", lambda *a, **k: pytest.fail("the engine started"))
    with pytest.raises(DaliFlError) as got:  # the Python API: before Ray starts
        simulate(run_config)
    assert str(got.value).startswith(want)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, takes", [("frac", "0.5", "a number"), ("deadline", "5", "a number"),
                                               ("lr", "x", "a number"), ("dp-epsilon", "abc", 'a number, or ""'),
                                               ("augment", "false", "true or false"),
                                               ("compile", "false", "true or false"), ("rounds", 2.5, "a whole number"),
                                               ("num-users", True, "a whole number"),
                                               ("server-betas", 0.9, "numbers as text"),
                                               ("lora-targets", 0.5, "text"), ("model-kwargs", True, "text")])
def test_a_run_config_value_of_the_wrong_type_is_refused_in_one_line_naming_its_key(store, tmp_path, key, value,
                                                                                      takes):
    """`flwr run APP --run-config 'augment=\"false\"'` gives a string: not taken as true, and no TypeError."""
    run_config = {**run_config_from_options({**TINY, "store": str(store)}, tmp_path / "run"), key: value}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(DaliFlError) as got:
        server_app(object(), context)
    shown = json.dumps(value) if not isinstance(value, bool) else "true"
    assert str(got.value).startswith(f"the Flower run config's {key} = {shown} must be {takes}")
    assert "\n" not in str(got.value)
    assert not (tmp_path / "run").exists()


def test_a_run_config_number_where_text_is_taken_is_its_text(store, tmp_path):
    """`--run-config lora-ranks=4` arrives as a TOML integer; so may a float option's 1."""
    run_config = {**run_config_from_options({**TINY, "store": str(store), "alg": "fedlora"}, tmp_path / "run"),
                  "lora-ranks": 4, "lr": 1}
    opts = options_from_run_config(run_config)[0]
    assert opts["lora_ranks"] == "4" and opts["lr"] == 1
    assert config_from_run_config(run_config)[0].local.lr == 1
    with pytest.raises(DaliFlError, match=r"--staleness '3' does not parse"):  # its own words, not AttributeError
        config_from_run_config({**run_config, "staleness": 3})


def test_an_unknown_run_config_key_is_refused_in_the_run_configs_spelling(store, tmp_path):
    """Not as `--data_on_gpu` or `async_` (its Python names), and with the nearest keys."""
    run_config = run_config_from_options({**TINY, "store": str(store)}, tmp_path / "run")
    with pytest.raises(DaliFlError) as got:
        config_from_run_config({**run_config, "asynk": True})
    message = str(got.value)
    assert message.startswith("the Flower run config's asynk is not an option of `dali-fl train`; did you mean async?")
    assert "data-on-gpu, " in message and "async_" not in message and "data_on_gpu" not in message
    assert ", out, " in message and ", resume, " in message  # the keys a run config has besides the options
    assert config_from_run_config({**run_config, "data_on_gpu": False})[0].data.data_on_gpu is False  # both spellings


def test_a_preset_in_the_run_config_is_refused_as_it_would_change_nothing(store, tmp_path, invoke):
    """The table holds every option and options override a preset; `flower app --preset` writes its values."""
    run_config = run_config_from_options({**TINY, "store": str(store)}, tmp_path / "run")
    with pytest.raises(DaliFlError, match=r"^the Flower run config's preset = \"tiny-32\" would change nothing"):
        config_from_run_config({**run_config, "preset": "tiny-32"})
    assert config_from_run_config({**run_config, "preset": ""})[0].fed.rounds == TINY["rounds"]
    result = invoke("flower", "app", tmp_path / "app", "--store", store, "--preset", "tiny-32", "--no-augment",
                    "--device", "cpu", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    written = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert "preset" not in written and written["rounds"] == 6  # tiny-32's


@pytest.mark.parametrize("extra", [["--frac", "0"], ["--lora-ranks", "2,4"], ["--server-lr", "0.5"],
                                   ["--fednova"], ["--scaffold", "--optimizer", "sgd"],
                                   ["--dp-clip", "1", "--scaffold"]])
def test_the_cli_refuses_in_one_line_like_train(store, tmp_path, invoke, assert_user_error, extra):
    args = ["--store", store, *FLAGS, *extra]
    line = assert_user_error(invoke("train", *args, "--out", tmp_path / "t"))
    assert assert_user_error(invoke("flower", "run", *args, "--out", tmp_path / "f")) == line
    assert assert_user_error(invoke("flower", "app", tmp_path / "app", *args, "--out", tmp_path / "f")) == line
    assert not (tmp_path / "app").exists() and not (tmp_path / "f").exists()
    assert_user_error(invoke("flower", "run", *args, "--nproc", "2"), "not available")


def test_without_flwr_the_command_says_which_extra_to_install(invoke, assert_user_error, monkeypatch):
    monkeypatch.setitem(sys.modules, "flwr", None)  # what an environment without the extra looks like
    assert_user_error(invoke("flower", "run", "--help"), "pip install 'dali-fl[flower]'")


def test_an_out_that_holds_a_run_names_a_way_on_that_the_flower_commands_take(store, tmp_path, invoke,
                                                                               assert_user_error):
    run = tmp_path / "cmp" / "dali-fl"
    train(TrainConfig.from_options({**TINY, "store": str(store), "rounds": 1}), run, progress=False)
    args = ["--store", store, *FLAGS]  # `flower` has no --resume: the hint names train's
    line = assert_user_error(invoke("flower", "run", *args, "--out", run), "already holds a run",
                             f"`dali-fl train --resume {run}`")
    assert "with --resume" not in line
    line = assert_user_error(invoke("flower", "compare", *args, "--out", run.parent), "already holds a comparison",
                             "choose another --out")
    assert "--resume" not in line


def test_flower_app_writes_an_app_and_the_flwr_command(store, tmp_path, invoke):
    result = invoke("flower", "app", tmp_path / "app", "--store", store, *FLAGS, "--alg", "fedlora",
                    "--out", tmp_path / "run", "--client-cpus", "64")  # for a larger machine than this one
    assert result.exit_code == 0, result.output
    assert (f"flwr run {tmp_path / 'app'} local --stream --federation-config "
            "\"num-supernodes=4 client-resources-num-cpus=64\"") in result.output
    assert "flower-superlink --insecure --disable-runtime-dependency-installation" in result.output
    assert (f"--node-config 'partition-id=3 store=\"{store.absolute()}\"'") in result.output  # the last client
    assert f"flwr run {tmp_path / 'app'} deployment --stream" in result.output
    run_config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg, out = config_from_run_config(run_config)
    assert out == tmp_path / "run" and cfg.fed.alg == "fedlora" and cfg.data.store == str(store.absolute())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pyproject.toml").write_text("[project]\n")
    assert invoke("flower", "app", tmp_path / "other", "--store", store, *FLAGS).exit_code == 2  # not ours


def test_flower_app_refuses_an_out_the_server_would_refuse_and_names_resume_for_a_run(store, tmp_path, invoke,
                                                                                       assert_user_error):
    """The server checks `out` when the run starts; an app written for a refused one was only found out then."""
    args = ["--store", store, *FLAGS]
    assert_user_error(invoke("flower", "app", tmp_path / "a", *args, "--out", store / "run"), "inside the store")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_user_error(invoke("flower", "app", tmp_path / "a", *args, "--out", tmp_path / "mine"), "not a dali-fl run")
    assert not (tmp_path / "a").exists()
    run = tmp_path / "run"
    train(TrainConfig.from_options({**TINY, "store": str(store), "rounds": 1}), run, progress=False)
    result = invoke("flower", "app", tmp_path / "a", *args, "--out", run)  # an app that continues the run is fine
    assert result.exit_code == 0, result.output
    assert f"{run} already holds a run: add --run-config resume=true" in result.output


def test_a_relative_weights_path_reaches_the_run_config_absolute_as_train_saves_it(store, tmp_path, invoke,
                                                                                    monkeypatch):
    """flwr's SuperLink and a later `dali-fl train --resume` have other working directories."""
    monkeypatch.chdir(tmp_path)
    args = ["--store", store, *FLAGS, "--pretrained", "--weights", "w.safetensors", "--out", "run"]
    result = invoke("flower", "app", "app", *args)
    assert result.exit_code == 0, result.output
    run_config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config["weights"] == str(tmp_path / "w.safetensors")
    simulated = []
    monkeypatch.setattr("dali_fl.flower.app.simulate", lambda c, **_: simulated.append(c) or [{"rounds": 0}])
    assert invoke("flower", "run", *args).exit_code == 0
    assert simulated[0]["weights"] == str(tmp_path / "w.safetensors")
    assert config_from_run_config(simulated[0])[0].model.weights == str(tmp_path / "w.safetensors")


def test_the_seeds_model_variant_reaches_the_run_config_as_the_pretrained_it_means(store, tmp_path, invoke):
    # The table held pretrained = true beside model-variant = "scratch", and the variant won: editing pretrained, as
    # `--run-config pretrained=true` does, changed nothing.
    result = invoke("flower", "app", tmp_path / "app", "--store", store, *FLAGS, "--model_variant", "scratch")
    assert result.exit_code == 0, result.output
    run_config = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config["pretrained"] is False and run_config["model-variant"] == ""
    assert config_from_run_config(run_config)[0].model.pretrained is False
    with pytest.raises(DaliFlError, match="model_variant pretrained and pretrained False disagree"):
        config_from_run_config({**run_config, "model-variant": "pretrained", "pretrained": False})


@pytest.mark.parametrize("clients", [1, 3, 4, 100])
def test_the_printed_deployment_starts_a_supernode_for_every_client(clients):
    """Every id is printed (three clients or fewer) or named by the line between the first and the last."""
    from dali_fl.flower.options import deploy_commands

    lines = deploy_commands(Path("app"), "/data/s", clients)
    ids = [int(ln.split("partition-id=")[1].split()[0]) for ln in lines if ln.startswith("flower-supernode")]
    between = [ln for ln in lines if ln.startswith("# ...")]
    if clients <= 3:
        assert ids == list(range(clients)) and not between
    else:
        assert ids == [0, clients - 1] and lines.index(between[0]) == 2
        assert f"each partition-id from 1 to {clients - 2}, on --port 9094 + id (9095 to {9092 + clients})" in \
            between[0]


def test_tensors_cross_the_wire_exactly_and_at_a_client_s_rank():
    gen = torch.Generator().manual_seed(0)
    state = {"l.lora_A.default.weight": torch.randn(4, 6, generator=gen),
             "l.lora_B.default.weight": torch.randn(5, 4, generator=gen), "head.weight": torch.randn(3, 2)}
    back = from_record(to_record(state), torch.device("cpu"))
    assert all(torch.equal(back[k], v) for k, v in state.items())
    pair = type("Pair", (), {"a": "l.lora_A.default.weight", "b": "l.lora_B.default.weight"})
    cut = at_rank(state, [pair], 2)
    assert cut[pair.a].shape == (2, 6) and cut[pair.b].shape == (5, 2) and cut["head.weight"] is state["head.weight"]
    padded = pad_like(cut, state)
    assert torch.equal(padded[pair.a][:2], state[pair.a][:2]) and not padded[pair.a][2:].any()
    assert torch.equal(padded[pair.b][:, :2], state[pair.b][:, :2]) and not padded[pair.b][:, 2:].any()


def test_a_lower_rank_flower_client_starts_from_the_global_model_under_fedex(store, tmp_path, monkeypatch):
    # Its factors cross the wire at its rank, so it cannot work out D_r itself: the base weights it is sent carry
    # it. Computed on the client from the truncated factors, D_r was wrong, and Flower's weights left dali-fl's.
    import dali_fl.engine.federation as fed
    from dali_fl.engine.local import ClientResult
    from dali_fl.engine.run import checkpoint_tensors, prepare
    from dali_fl.flower.client import train_client
    from dali_fl.flower.server import train_contents
    from dali_fl.flower.wire import ARRAYS, BASE
    from dali_fl.model.build import load_state_
    from tests.algorithms.common import effective_weights

    cfg = TrainConfig.from_options({**TINY, "store": str(store), "alg": "fedlora", "lora_agg": "fedex",
                                    "lora_ranks": "2,4", "frac": 1.0})
    fx, _ = prepare(cfg, tmp_path / "r", resume=False, write=False)
    starts = []

    def idle(model, loader, indices, *args):  # a client that takes no step: where it starts is all it shows
        starts.append(effective_weights(fx))
        return ClientResult(len(indices), 0.0, 0.0, 0.0, 0)

    try:
        fed.run_round(fx, 1)
        want, (state, base) = effective_weights(fx), checkpoint_tensors(fx)
        server = {**{k: v.clone() for k, v in state.items()}, **{k: v.clone() for k, v in base.items()}}
        monkeypatch.setattr(fed, "local_train", idle)
        for c, content in enumerate(train_contents(fx, np.arange(4), 2)):
            start = pad_like(from_record(content[ARRAYS], fx.device), trainable_state(fx.model))
            train_client(fx, start, from_record(content[BASE], fx.device), 2, c)
            load_state_(fx.model, server)  # the same process plays the server: its model back as it was
    finally:
        fx.close()
    assert sorted(fx.ranks.tolist()) == [2, 2, 4, 4] and len(starts) == 4
    for start in starts:
        for k in want:
            torch.testing.assert_close(start[k], want[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("alg, values, base", [("fedavg", 85_806_346, 0), ("fedlora", 450_058, 28_311_552)])
def test_vit_b16_parameter_counts_behind_the_readme_s_bytes_per_round(alg, values, base):
    lora = {"lora_agg": "fedex"} if alg == "fedlora" else {}  # FedAvg refuses the LoRA options it would ignore
    cfg = TrainConfig.from_options(dict(model="vit", pretrained=False, alg=alg, store="x", **lora))
    with torch.device("meta"):  # shapes only
        model = build_model(cfg.model, 10, 224, 0)
    params = dict(model.named_parameters())
    assert sum(t.numel() for t in trainable_state(model).values()) == values
    pairs = lora_pairs(model) if alg == "fedlora" else []  # FedEx-LoRA's download adds these base weights
    assert sum(params[p.base].numel() for p in pairs) == base


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "state.safetensors"))


def _wire_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return to_record(tensors).count_bytes() if tensors else 0


@pytest.mark.slow
def test_flower_s_simulation_engine_reaches_dali_fl_s_weights_and_accuracies(store, tmp_path):
    # FedNova weighs each client by the local steps it reports: they must cross the wire (steps 0 would refuse).
    # Mixed-rank FedEx: a lower-rank client's D_r travels in its base weights (it left dali-fl's by 1.8e-3 before).
    modes = {"fedavg": dict(alg="fedavg"), "fedex": dict(alg="fedlora", lora_r=2, lora_agg="fedex"),
             "fednova": dict(alg="fedlora", lora_r=2, fednova=True, optimizer="sgd", momentum=0.5, lr=0.05),
             "fedex-ranks": dict(alg="fedlora", lora_agg="fedex", lora_ranks="2,4")}
    runs = [run_config_from_options({**TINY, "store": str(store), **m}, tmp_path / f"flower-{k}")
            for k, m in modes.items()]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what Ray gives the one client worker below (client_cpus=2)
    try:
        simulate(*runs, client_cpus=2)  # Ray, 4 SuperNodes, one client worker; both federations, one engine start
        for name, mode in modes.items():
            train(TrainConfig.from_options({**TINY, "store": str(store), **mode}), tmp_path / f"dali-{name}",
                  progress=False)
    finally:
        torch.set_num_threads(threads)
    for name in modes:
        flower, dali = _state(tmp_path / f"flower-{name}"), _state(tmp_path / f"dali-{name}")
        assert flower.keys() == dali.keys()
        for k in dali:  # as tests/test_distributed.py: only the threads' summation order may differ
            torch.testing.assert_close(flower[k], dali[k], rtol=1e-4, atol=1e-5)
        rows, ref = read_metrics(tmp_path / f"flower-{name}"), read_metrics(tmp_path / f"dali-{name}")
        assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in ref]
        assert [r["upload_mb"] for r in rows] == [r["upload_mb"] for r in ref]
        assert all(r["federations_built"] == 1 and r["client_processes"] == 1 for r in rows)  # built once, reused
        if "lora_ranks" in modes[name]:
            continue  # a lower-rank client's factors cross at its rank: the byte counts below are for one rank
        trainable = {k: v for k, v in dali.items() if not k.startswith(BASE_PREFIX)}
        base = {k: v for k, v in dali.items() if k.startswith(BASE_PREFIX)}
        assert all(r["bytes_up"] == 2 * _wire_bytes(trainable) for r in rows)  # 2 clients a round
        names = {k[len(BASE_PREFIX):]: v for k, v in base.items()}
        assert all(r["bytes_down"] == 2 * (_wire_bytes(trainable) + _wire_bytes(names)) for r in rows)
    assert json.loads((tmp_path / "flower-fedex" / "config.json").read_text())["fed"]["lora_agg"] == "fedex"


def test_a_node_reads_its_own_store_only_when_it_is_the_run_s(store, tmp_path):
    """--node-config store: the node's copy; missing or another store is refused in a line naming the node."""
    from types import SimpleNamespace

    from dali_fl.data.store import MANIFEST
    from dali_fl.flower.client import node_store
    from dali_fl.safe_fs import sha256

    want = sha256(store / MANIFEST)
    node = lambda **config: SimpleNamespace(node_config={"partition-id": 1, **config})  # noqa: E731
    assert node_store(node(), str(store), want) == str(store)  # simulation: the run's path
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    assert node_store(node(store=str(copy)), str(store), want) == str(copy)
    with pytest.raises(DaliFlError, match=r"the SuperNode holding client 1 has no store at .*nowhere \(no manifest"):
        node_store(node(store=str(tmp_path / "nowhere")), str(store), want)
    other, _ = write_store(load_synthetic(200, 50, seed=1), tmp_path / "other", 16, progress=False)
    with pytest.raises(DaliFlError, match=r"client 1: the store at .*other.* is not the run's"):
        node_store(node(store=str(other)), str(store), want)


def test_a_flower_resume_keeps_the_run_s_settings_but_rounds(store, tmp_path):
    """`flwr run --run-config resume=true`: the saved config, with only rounds and device taken from the run config."""
    from dali_fl.flower.options import resume_of
    from dali_fl.flower.server import resumed_config

    run = tmp_path / "run"
    train(TrainConfig.from_options({**TINY, "store": str(store)}), run, progress=False)
    more, _ = config_from_run_config(run_config_from_options({**TINY, "store": str(store), "rounds": 4}, run),
                                     settle=False)  # the ServerApp's, for a resume
    assert resumed_config(more, run).fed.rounds == 4
    assert resumed_config(more, run).to_json() == TrainConfig.from_options({**TINY, "store": str(store),
                                                                            "rounds": 4}).to_json()
    other, _ = config_from_run_config(run_config_from_options({**TINY, "store": str(store), "lr": 0.5}, run))
    with pytest.raises(DaliFlError, match=r"resume keeps the run's settings: the run config's lr is 0.5"):
        resumed_config(other, run)
    assert resume_of({"resume": True}) and not resume_of({})
    with pytest.raises(DaliFlError, match="must be true or false"):
        resume_of({"resume": "yes"})


def test_a_flower_resume_of_a_dp_epsilon_run_keeps_its_noise_and_names_a_changed_field(store, tmp_path, monkeypatch):
    """As `dali-fl train --resume RUN --rounds 4`: z stays the one calibrated for the first rounds (the run is
    extended); a changed option is named with its two values."""
    from dali_fl.flower.server import resumed_config

    run, dp = tmp_path / "run", {**TINY, "store": str(store), "rounds": 1, "dp_clip": 1.0, "dp_epsilon": 8.0}
    train(TrainConfig.from_options(dp), run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    more = run_config_from_options({**dp, "rounds": 4}, run)
    reached = DaliFlError("stopped at the nodes")  # past the resume's checks, with config.json written

    def stop(*args):
        raise reached

    monkeypatch.setattr("dali_fl.flower.server.client_nodes", stop)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={**more, "resume": True})
    with pytest.raises(DaliFlError) as got:
        server_app(object(), context)
    assert got.value is reached
    now = json.loads((run / "config.json").read_text())
    assert now["fed"]["rounds"] == 4 and now["algorithms"]["dp"] == saved["algorithms"]["dp"]
    other, _ = config_from_run_config(run_config_from_options({**dp, "dp_clip": 2.0}, run), settle=False)
    with pytest.raises(DaliFlError, match=r"the run config's dp-clip is 2.0, .*config.json has 1.0 \(only rounds"):
        resumed_config(other, run)


def test_a_refusal_before_round_1_leaves_nothing_of_the_run_so_a_retry_starts(store, tmp_path, monkeypatch):
    """As train: in a directory the run made, nothing; in the user's own (made empty beforehand), no file of the
    run but the lock a retry takes. A refused start over another run leaves that run as it was and says how
    `flwr run` continues it."""
    import dali_fl.flower.server as server

    def refuse(*args):
        raise DaliFlError("no Flower SuperNode holds client 0")

    def serve_at(run: Path, resume: bool = False) -> str:
        run_config = {**run_config_from_options({**TINY, "store": str(store)}, run), "resume": resume}
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
        with pytest.raises(DaliFlError) as got:
            server_app(object(), context)
        return str(got.value)

    monkeypatch.setattr(server, "client_nodes", refuse)  # a SuperNode missing
    made = tmp_path / "made"
    made.mkdir()
    for _ in range(2):  # the retry is not refused as "already holds a run"
        assert serve_at(made) == "no Flower SuperNode holds client 0"
        assert sorted(p.name for p in made.iterdir()) == [".lock"]
    assert serve_at(tmp_path / "new" / "run") == "no Flower SuperNode holds client 0"
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(server, "client_nodes", lambda grid, cfg: dict.fromkeys(range(cfg.fed.num_users), 1))
    monkeypatch.setattr(server, "flower_round", lambda *a: refuse())  # round 1 fails, after its log was opened
    assert serve_at(made) == "no Flower SuperNode holds client 0"
    assert sorted(p.name for p in made.iterdir()) == [".lock"]
    run = tmp_path / "run"
    train(TrainConfig.from_options({**TINY, "store": str(store), "rounds": 1}), run, progress=False)
    before = sorted(p.name for p in run.iterdir())
    line = serve_at(run)  # `flwr run`'s ways on: it has no --resume and no --out
    assert line == f"{run} already holds a run; continue it with --run-config resume=true or choose another out " \
                   "(--run-config 'out=\"DIR\"')"
    assert sorted(p.name for p in run.iterdir()) == before
    # A resume of no run: the lock made the directories (inside a store, blocking its `prep --force`) and stayed.
    assert "is not a dali-fl run" in serve_at(tmp_path / "none" / "run", resume=True)
    assert not (tmp_path / "none").exists()


def test_a_node_holds_one_client_or_several():
    """--node-config partition-id=N, or clients="A-B,C" for a site with several; anything else in one line."""
    from types import SimpleNamespace

    from dali_fl.flower.client import node_clients

    node = lambda **config: SimpleNamespace(node_config=config)  # noqa: E731
    assert node_clients(node(**{"partition-id": 3})) == [3]
    assert node_clients(node(clients="0-2,7, 5")) == [0, 1, 2, 5, 7]
    assert node_clients(node(clients=4, **{"partition-id": 9})) == [4]  # clients wins over the simulation's id
    for bad in ("", "a", "3-1", "-1", "1-", "0-9999999", "1e3", "²"):
        with pytest.raises(DaliFlError, match=r"is not a client id or a range A-B"):
            node_clients(node(clients=bad))
    with pytest.raises(DaliFlError, match=r"holds no client; start it with --node-config 'partition-id=N'"):
        node_clients(node())
    assert node_clients(node(**{"partition-id": "2"})) == [2]
    for bad in (1.5, True, "two", "²"):  # 1.5 and true were client 1, "two" a ValueError traceback on the node
        with pytest.raises(DaliFlError, match=r"partition-id=.* is not a client id; give a whole number"):
            node_clients(node(**{"partition-id": bad}))


def test_every_client_is_held_by_exactly_one_node():
    from dali_fl.flower.server import assign

    assert assign([(11, [0, 2]), (12, [1])], 3) == {0: 11, 2: 11, 1: 12}
    with pytest.raises(DaliFlError, match=r"client 2 is held by two Flower nodes, 11 and 13"):
        assign([(11, [0, 2]), (12, [1]), (13, [2])], 3)
    with pytest.raises(DaliFlError, match=r"no Flower SuperNode holds client 1 \(2 of 3 clients have one\)"):
        assign([(11, [0, 2])], 3)
    # Simulating federations of several sizes on one engine start: the larger one's extra nodes get no work.
    assert assign([(11, [0, 1, 2]), (12, [3])], 3) == {0: 11, 1: 11, 2: 11}


def test_max_weight_diff_is_the_largest_difference_of_two_runs_final_tensors(tmp_path):
    from safetensors.torch import save_file

    from dali_fl.flower.compare import max_weight_diff

    for name, shift in (("a", 0.0), ("b", 0.25)):
        (tmp_path / name / "checkpoint").mkdir(parents=True)
        save_file({"w": torch.zeros(3) + torch.tensor([0.0, shift, 0.0]), "v": torch.ones(2)},
                  str(tmp_path / name / "checkpoint" / "state.safetensors"))
    assert max_weight_diff(tmp_path / "a", tmp_path / "b") == 0.25
    assert max_weight_diff(tmp_path / "a", tmp_path / "a") == 0.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_ctrl_c_stops_flower_run_at_once_and_leaves_no_ray(store, tmp_path):
    import os
    import signal
    import subprocess
    import time

    import psutil

    run = tmp_path / "run"
    args = [a for a in FLAGS if a not in ("--rounds", "2")] + ["--rounds", "100", "--alg", "fedlora", "--lora-r", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "dali_fl", "flower", "run", "--store", str(store), "--out", str(run),
                             *args, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # a group of its own, as a terminal's Ctrl-C reaches it
                            # and Ctrl-C's default action, as a terminal's job has: a suite started in the background
                            # by a shell (`make test &`) ignores SIGINT, and its children inherit that.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 200
    while not (run / "checkpoint").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("flower run still ran 60 s after Ctrl-C (it used to wait for a second one)")
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted"), (
        proc.returncode, [p.name for p in run.iterdir()] if run.exists() else None, err[-3000:])
    psutil.wait_procs(family, timeout=30)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert (run / "checkpoint" / "meta.json").is_file()  # the rounds that finished are kept
