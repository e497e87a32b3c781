"""A Flower run config is `dali-fl train`'s options as one flat table, validated by TrainConfig.from_options."""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union, get_args, get_type_hints

from dali_fl import algorithms
from dali_fl.config import SECTIONS, TrainConfig, option_defaults, option_fields
from dali_fl.errors import DaliFlError

Scalar = Union[bool, int, float, str]
# Options whose default is None: a TOML table cannot hold None, so "" stands for it.
NULLABLE = frozenset({"model_variant", *(k for k, v in option_defaults().items() if v is None)})
# Keys a Flower run config has besides the run's options: where the server writes, and whether to continue that
# run directory from its last finished round (`flwr run APP --run-config resume=true`). A `preset` is refused: the
# table spells out every option, and explicit options override a preset, so it would change nothing.
OUT, PRESET, RESUME = "out", "preset", "resume"
MARKER = "# Written by `dali-fl flower app`"
COMPONENTS = {"serverapp": "dali_fl.flower.app:server_app", "clientapp": "dali_fl.flower.app:client_app"}


def _scalar(value: Any) -> Scalar:
    """One option value as a TOML scalar: tuples as comma-separated text, paths as text, None as ""."""
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_config_key(name: str) -> str:
    """An option's run-config key: its flag without `--` (`async_`, a Python keyword with a trailing _, is
    `--async` on the command line, so `async` here)."""
    return name.rstrip("_").replace("_", "-")


def run_config_from_options(options: Mapping[str, Any], out: Path) -> dict[str, Scalar]:
    """Every option (defaults filled in) under its flag's name without `--`, plus `out`, the run directory."""
    merged = {**option_defaults(), **options}
    config = {run_config_key(name): _scalar(value) for name, value in merged.items()}
    config[OUT] = str(out)
    config[RESUME] = False
    return config


def options_from_run_config(run_config: Mapping[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
    """(flat options for TrainConfig.from_options, run directory) from a Flower run config; a value of the wrong
    type (`augment = "false"`, `frac = "0.5"`) or a `preset` is refused in one line naming its key."""
    if run_config.get(PRESET, "") != "":
        raise DaliFlError(f"the Flower run config's {PRESET} = {_toml_value(run_config[PRESET])} would change "
                          "nothing: the table holds every option, and options override a preset; write the app "
                          "with `dali-fl flower app DIR --preset NAME` (it writes the preset's values), or drop it")
    opts: dict[str, Any] = {}
    defaults, kinds = option_defaults(), option_kinds()
    for key, value in run_config.items():
        name = str(key).replace("-", "_")
        if name not in defaults and name + "_" in defaults:  # async: the option async_
            name += "_"
        if name not in kinds and key not in (PRESET, RESUME):
            _unknown(str(key), kinds)
        if name in NULLABLE and value == "":
            value = None
        elif name in kinds:
            value = _typed(str(key), value, kinds[name], name in NULLABLE)
        opts[name] = value
    out = opts.pop(OUT, None)
    opts.pop(PRESET, None)  # "" (none), as refused above otherwise
    opts.pop(RESUME, None)  # the ServerApp's, read by `resume_of`
    return opts, None if out in (None, "") else str(out)


def _unknown(key: str, kinds: Mapping[str, type]) -> None:
    """Refuse a key that is no option, in the run config's own spelling, with the nearest keys."""
    known = sorted({run_config_key(n) for n in kinds} | {RESUME})
    near = difflib.get_close_matches(key, known, n=3)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise DaliFlError(f"the Flower run config's {key} is not an option of `dali-fl train`; {hint}"
                      f"known keys: {', '.join(known)}")


def option_kinds() -> dict[str, type]:
    """Each run-config key's Python type (bool, int, float, str; tuple for server-betas), by option name: its
    default's, else (a None default) its field's or its declared one."""
    kinds = {name: type(v) for name, v in option_defaults().items() if v is not None}
    fields = option_fields()
    for name in NULLABLE - set(kinds):
        section, field = fields.get(name, ("", name))
        if section == "algorithms":
            kinds[name] = algorithms.option_fields()[name][1].metadata["type"]
        elif section in SECTIONS:
            kinds[name] = next(t for t in get_args(get_type_hints(SECTIONS[section])[field]) if t is not type(None))
        else:  # model_variant, the seed's spelling of --pretrained: a choice of text
            kinds[name] = str
    return {**kinds, OUT: str}


KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text (in quotes)",
              tuple: "numbers as text, e.g. \"0.9,0.99\""}


def _typed(key: str, value: Any, kind: type, nullable: bool) -> Any:
    """`value` as its option's type, or a DaliFlError naming the key, the value and what it takes."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return value  # TOML's 1 for 1.0, kept as given as `dali-fl train` takes it from Python
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # `--run-config lora-ranks=4` arrives as a TOML integer; its text is unambiguous
    if kind is tuple and isinstance(value, str):
        return _floats(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    unset = ", or \"\" for none" if nullable else ""
    raise DaliFlError(f"the Flower run config's {key} = {_toml_value(value)} must be {KIND_WORDS[kind]}{unset}")


def _floats(text: str) -> Any:
    """"0.9,0.99" -> (0.9, 0.99); anything else as it is, for FedOptParams to refuse in its words."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        return text


def config_from_run_config(run_config: Mapping[str, Any], settle: bool = True) -> tuple[TrainConfig, Path]:
    """The run's TrainConfig and directory; a config `dali-fl train` refuses raises its one-line DaliFlError.
    `settle=False`: what the algorithms derive is left as given (a resume keeps the saved run's)."""
    opts, out = options_from_run_config(run_config)
    cfg = TrainConfig.from_options(opts, settle=settle)
    algorithms.refuse_one_process(cfg, "the Flower app does not run it", "use `dali-fl train`")
    refuse_clock(cfg)
    if out is None:
        raise DaliFlError("the Flower run config has no `out` (the run directory); add out = \"RUN_DIR\" to "
                          "[tool.flwr.app.config] or write the app with `dali-fl flower app DIR --out RUN_DIR`")
    return cfg, Path(out)


def resume_of(run_config: Mapping[str, Any]) -> bool:
    """Whether the run config asks to continue its run directory (`resume = true`)."""
    value = run_config.get(RESUME, False)
    if not isinstance(value, bool):
        raise DaliFlError(f"the Flower run config's resume = {value!r} must be true or false")
    return value


def refuse_clock(cfg: TrainConfig) -> None:
    """The Flower app reports the simulated clock (sim_time_s) but drops, skips and buffers no client."""
    clock, defaults = cfg.clock, type(cfg.clock)()
    asked = [f for f, on in (("--deadline", clock.deadline != defaults.deadline),
                             ("--over-select", clock.over_select != defaults.over_select),
                             ("--trace", bool(clock.trace)),
                             *((c.flag, True) for c in algorithms.active_classes(cfg) if c.asynchronous)) if on]
    if asked:
        raise DaliFlError(f"the Flower app runs synchronous rounds of every sampled client; {asked[0]} runs in "
                          "`dali-fl train`")


def _toml_value(value: Scalar) -> str:
    """A TOML scalar; JSON's string escapes are valid TOML basic-string escapes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def app_toml(run_config: Mapping[str, Scalar]) -> str:
    """The pyproject.toml of a Flower app whose components are dali-fl's and whose run config is `run_config`."""
    config = "\n".join(f"{key} = {_toml_value(value)}" for key, value in run_config.items())
    components = "\n".join(f"{key} = {json.dumps(value)}" for key, value in COMPONENTS.items())
    return f"""{MARKER}: the Flower ServerApp and ClientApp of dali-fl.
# Every `dali-fl train` option is in [tool.flwr.app.config]; edit it here or override one with
# `flwr run DIR --run-config 'key=value'`. The server validates it exactly as `dali-fl train` would.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dali-fl-flower"
version = "1.0.0"
description = "dali-fl's federation (FedAvg / FedLoRA) as a Flower app"
license = "Apache-2.0"
# Empty on purpose: flwr installs an app's dependencies into a fresh environment in front of its own, and
# dali-fl, torch and DALI come from the environment that runs flwr.
dependencies = []

[tool.flwr.app]
publisher = "dali-fl"

[tool.flwr.app.components]
{components}

[tool.flwr.app.config]
{config}
"""


def write_app(app_dir: Path, run_config: Mapping[str, Scalar]) -> Path:
    """Write APP_DIR/pyproject.toml (replacing only one this command wrote); returns its path."""
    path = Path(app_dir) / "pyproject.toml"
    if path.exists() and not path.read_text(errors="replace").startswith(MARKER):
        raise DaliFlError(f"{path} exists and was not written by `dali-fl flower app`; choose another directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(app_toml(run_config))
    except OSError as err:
        raise DaliFlError(f"cannot write {path} ({err.strerror})") from None
    return path


def flwr_command(app_dir: Path, num_supernodes: int, client_cpus: float = 1, client_gpus: float = 0) -> str:
    """The `flwr run` line for a local simulation with one SuperNode per dali-fl client."""
    gpus = f" client-resources-num-gpus={client_gpus:g}" if client_gpus else ""
    return (f"flwr run {app_dir} local --stream --federation-config "
            f"\"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus:g}{gpus}\"")


def deploy_commands(app_dir: Path, store: str, num_users: int) -> list[str]:
    """The commands of a deployment on this machine: a SuperLink, one SuperNode per client, `flwr run`; past three
    clients, the first and last SuperNode with a line saying to start one for each id between them."""
    def node(c: int) -> str:
        return (f"flower-supernode --insecure --superlink 127.0.0.1:8000 --port {9094 + c} "
                f"--node-config 'partition-id={c} store=\"{store}\"'")

    last = num_users - 1
    nodes = [node(c) for c in range(num_users)]
    if num_users > 3:  # a line per client would bury the other commands; the elision says what it stands for
        between = (f"# ... and one SuperNode like these for each partition-id from 1 to {last - 1}, on --port "
                   f"9094 + id (9095 to {9094 + last - 1})")
        nodes = [nodes[0], between, nodes[-1]]
    return ["flower-superlink --insecure --disable-runtime-dependency-installation", *nodes,
            f"flwr run {app_dir} deployment --stream  # [superlink.deployment] address = \"127.0.0.1:8000\", "
            "insecure = true in $FLWR_HOME/config.toml"]
