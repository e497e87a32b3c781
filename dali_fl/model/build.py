"""The timm ViT, its pretrained weights (hub or local file), peft LoRA, and the trainable state."""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

from dali_fl.errors import DaliFlError
from dali_fl.model.ranks import MAX_RANK
from dali_fl.safe_fs import check_input_file

log = logging.getLogger(__name__)

MODEL_ALIASES = {"vit": "vit_base_patch16_224", "vit-b16": "vit_base_patch16_224"}
DEFAULT_LORA_TARGETS = (r".*\.attn\.qkv", r".*\.attn\.proj")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
# timm kwargs that are sizes or counts, with their largest accepted value: zero, negative or non-finite values
# crash deep inside timm, and a huge depth makes timm build modules (and lists of drop rates) without end.
# The caps are far beyond the largest published ViTs (ViT-22B: depth 48, width 6144, 48 heads).
KWARG_CAPS = {"patch_size": 1024, "depth": 1024, "embed_dim": 1 << 16, "num_heads": 1024, "mlp_ratio": 64,
              "reg_tokens": 64}  # 99,999 register tokens made one round run for minutes
INTEGER_KWARGS = ("patch_size", "depth", "embed_dim", "num_heads", "reg_tokens")
ZERO_KWARGS = ("reg_tokens",)


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a timm model name, its kwargs, where weights come from, and LoRA settings."""

    name: str = "vit_base_patch16_224"
    kwargs: dict = field(default_factory=dict)
    pretrained: bool = True
    weights: Optional[str] = None
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    freeze_lora_a: bool = False  # FFA-LoRA: A stays at its shared random init

    def __post_init__(self) -> None:
        if self.lora and not (1 <= self.lora_r <= MAX_RANK and self.lora_alpha > 0):
            raise DaliFlError(f"--lora-r must be in 1..{MAX_RANK} and --lora-alpha > 0 (got {self.lora_r}, "
                              f"{self.lora_alpha})")
        if self.weights is not None and not str(self.weights).endswith(WEIGHT_SUFFIXES):
            raise DaliFlError(f"--weights {self.weights}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
        for key, cap in KWARG_CAPS.items():
            if key in self.kwargs:
                _check_size_kwarg(key, self.kwargs[key], cap)
        for key, value in self.kwargs.items():  # timm's dropout takes nan, then fails on the first batch
            if key.endswith("_rate") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not 0 <= value <= 1):
                raise DaliFlError(f"--model-kwargs {key}={value} must be a number from 0 to 1")
        if self.kwargs.get("in_chans", 3) != 3:  # it builds, then fails on the first batch
            raise DaliFlError(f"--model-kwargs in_chans={self.kwargs['in_chans']}: stores hold RGB images, so the "
                              "model takes 3 channels; drop in_chans")
        if self.lora:
            _check_lora_targets(self.lora_targets)


def _check_size_kwarg(key: str, value: object, cap: int) -> None:
    """A size or count kwarg is a finite number in (0, cap] (a count of extra tokens may be 0), and a whole number
    where timm counts with it."""
    whole, low = key in INTEGER_KWARGS, 0 if key in ZERO_KWARGS else 1
    kind = f"a whole number from {low} to {cap}" if whole else f"a number above 0 and at most {cap}"
    ok_type = not isinstance(value, bool) and (isinstance(value, int) if whole else isinstance(value, (int, float)))
    if not ok_type or not math.isfinite(value) or not (low <= value <= cap if whole else 0 < value <= cap):
        raise DaliFlError(f"--model-kwargs {key}={value} must be {kind}")


def _check_lora_targets(targets: tuple[str, ...]) -> None:
    """At least one target, and every regex among them compiles."""
    if not targets:
        raise DaliFlError("--lora-targets names no module; give comma-separated names or regexes (e.g. qkv,proj)")
    for target in targets:
        if _is_regex(target):
            try:
                re.compile(target)
            except re.error as err:
                raise DaliFlError(f"--lora-targets {target!r} is not a valid regular expression ({err})") from None


def parse_model_kwargs(text: str) -> dict:
    """Parse `k=v,k=v` into a dict, turning numbers and booleans into Python values."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        if "=" not in item:
            raise DaliFlError(f"--model-kwargs item {item!r} is not key=value (e.g. patch_size=4,depth=4)")
        key, value = (s.strip() for s in item.split("=", 1))
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = {"true": True, "false": False}.get(value.lower(), value) if isinstance(value, str) else value
    return out


def expected_image_size(spec: ModelSpec) -> Optional[int]:
    """The input size pretrained weights expect, or None when any size works (random init)."""
    import timm

    if not spec.pretrained or (spec.weights is not None and not str(spec.weights).endswith(".npz")):
        return None  # a local state dict says its own size: its position embeddings are checked as it loads
    cfg = timm.models.get_pretrained_cfg(spec.name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None


def _create(spec: ModelSpec, num_classes: int, img_size: int) -> nn.Module:
    import timm

    kwargs = {**spec.kwargs, "num_classes": num_classes, "img_size": img_size}
    if not spec.pretrained:
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    if spec.weights is not None:
        check_input_file(spec.weights, "--weights", f"give a local {', '.join(WEIGHT_SUFFIXES)} file")
        return _create_from_file(spec, kwargs)
    return _create_from_hub(spec.name, kwargs)


def _create_from_file(spec: ModelSpec, kwargs: dict) -> nn.Module:
    """timm's model with weights from a local file; unsafe or unreadable files are one clear error."""
    import pickle

    import timm
    from safetensors import SafetensorError

    model = timm.create_model(spec.name, pretrained=False, **kwargs)
    try:
        if str(spec.weights).endswith(".npz"):  # big_vision / JAX layout: timm's reader names what it misses
            model.load_pretrained(str(spec.weights))
        else:
            _load_checked(model, spec)
        return model
    except (pickle.UnpicklingError, SafetensorError, OSError, ValueError, RuntimeError, KeyError, EOFError,
            AttributeError) as err:
        if "Unsupported global" in str(err):  # torch.load(weights_only=True) refused objects that could run code
            raise DaliFlError(f"--weights {spec.weights} is a pickle holding more than tensors and is not loaded, "
                              "for safety; convert it to .safetensors") from None
        if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):  # no global named: not a pickle
            raise DaliFlError(f"--weights {spec.weights} cannot be read as {spec.name} weights (not a PyTorch "
                              "checkpoint)") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DaliFlError(f"--weights {spec.weights} cannot be read as {spec.name} weights "
                          f"({type(err).__name__}{': ' + first[:200] if first else ''})") from None


def _load_checked(model: nn.Module, spec: ModelSpec) -> None:
    """Load a state-dict file as timm would (its filter resamples position embeddings), but refuse one that leaves
    any tensor besides the head unloaded or holds tensors the model lacks: timm only logs those."""
    import sys

    from timm.models import load_state_dict

    state = load_state_dict(str(spec.weights))  # torch.load(weights_only=True); unwraps "state_dict", "model"
    module = sys.modules[type(model).__module__]
    _check_grid(model, state, spec)
    if hasattr(module, "checkpoint_filter_fn"):
        state = module.checkpoint_filter_fn(state, model)
    own, heads = model.state_dict(), head_names(model)
    in_head = lambda key: any(key.startswith(h + ".") for h in heads)  # noqa: E731
    for key in [k for k in state if in_head(k) and (k not in own or state[k].shape != own[k].shape)]:
        del state[key]  # another dataset's head: this one starts from its seeded init (a fitting head loads)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not in_head(k)]
    extra = result.unexpected_keys
    if missing or extra:
        raise ValueError(f"it does not fit {spec.name} with --model-kwargs {spec.kwargs}: {len(missing)} of the "
                         f"model's tensors are not in it{' (e.g. ' + missing[0] + ')' if missing else ''} and it "
                         f"holds {len(extra)} the model lacks{' (e.g. ' + extra[0] + ')' if extra else ''}")


def _check_grid(model: nn.Module, state: Mapping[str, torch.Tensor], spec: ModelSpec) -> None:
    """Refuse weights made for another image size, as hub weights are: timm's filter would resample their position
    embeddings to the store's grid without a word (a 224px file's 14x14 onto a 32px store's 2x2)."""
    own, theirs = getattr(model, "pos_embed", None), state.get("pos_embed")
    if own is None or theirs is None or theirs.shape[1] == own.shape[1]:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    patch, grid = model.patch_embed.patch_size[0], model.patch_embed.grid_size[0]  # timm ViTs all have these
    side = math.isqrt(max(theirs.shape[1] - prefix, 0))
    made = f"{side * patch}px images" if side * side == theirs.shape[1] - prefix else "another image size"
    raise DaliFlError(f"--weights {spec.weights} was made for {made} ({theirs.shape[1]} position embeddings), but "
                      f"the model takes {grid * patch}px ({own.shape[1]}); use a store (or --resize-to) of the "
                      "weights' size, or weights made at the store's")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hugging Face endpoint, instead of minutes of client retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_offline(name: str) -> bool:
    """Whether the hub weights of `name` are already in the local Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None)
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str)
                              for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def _create_from_hub(name: str, kwargs: dict) -> nn.Module:
    """timm's hub weights: from the local cache when there, else downloaded; offline is one clear error."""
    import timm
    from huggingface_hub import constants

    cached = _cached_offline(name)
    if not cached and not _hub_reachable():
        raise DaliFlError(f"no internet to download pretrained weights for {name}, and they are not in the "
                          "Hugging Face cache; pass --weights PATH (a local .safetensors/.pth/.npz), fill the "
                          "cache (HF_HOME), or use --no-pretrained")
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or cached  # a cached model must not wait on the network
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, ValueError) as err:
        raise DaliFlError(f"cannot load pretrained weights for {name} ({type(err).__name__}: {err}); pass "
                          "--weights PATH, fill the Hugging Face cache (HF_HOME), or use --no-pretrained") from None
    finally:
        constants.HF_HUB_OFFLINE = saved


def check_fits_memory(spec: ModelSpec, num_classes: int, img_size: int) -> None:
    """Refuse a model whose float32 weights alone exceed this machine's memory (counted on the meta device)."""
    import timm

    kwargs = {**spec.kwargs, "num_classes": num_classes, "img_size": img_size}
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, so any size is safe to count
            params = sum(p.numel() for p in timm.create_model(spec.name, pretrained=False, **kwargs).parameters())
    except Exception:  # noqa: BLE001 - the real build below reports what is wrong with the kwargs
        return
    need, have = 4 * params, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise DaliFlError(f"{spec.name} with --model-kwargs {spec.kwargs} has {params / 1e9:.1f} G parameters: "
                          f"{need / 2**30:.0f} GiB in float32, more than this machine's {have / 2**30:.0f} GiB; "
                          "use a smaller depth or embed_dim")


def build_model(spec: ModelSpec, num_classes: int, img_size: int, seed: int) -> nn.Module:
    """Build the model (and LoRA adapters) with a seeded init, so every run and resume agrees."""
    import timm

    if not timm.is_model(spec.name):
        raise DaliFlError(f"unknown timm model {spec.name!r} (try vit_base_patch16_224 or vit_tiny_patch16_224)")
    want = expected_image_size(spec)
    if want is not None and want != img_size:
        raise DaliFlError(f"the store holds {img_size}px images but pretrained {spec.name} expects {want}px; "
                          f"resize them on the device with --resize-to {want}, use a {want}px store (`dali-fl prep "
                          f"--image-size {want}`), or train with --no-pretrained")
    check_fits_memory(spec, num_classes, img_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = _create(spec, num_classes, img_size)
        except TypeError as err:
            if "img_size" in str(err) and "img_size" not in spec.kwargs:  # timm's CNNs take no input size
                raise DaliFlError(f"--model {spec.name} is not a Vision Transformer: dali-fl trains timm ViTs (models "
                                  "that take img_size), e.g. vit_tiny_patch16_224 or vit_base_patch16_224") from None
            raise DaliFlError(f"--model-kwargs do not fit {spec.name}: {err}") from None
        except AssertionError as err:  # timm asserts e.g. that img_size is divisible by patch_size
            raise DaliFlError(f"{spec.name} cannot take {img_size}px input with these kwargs ({err})") from None
        except (ValueError, RuntimeError, ZeroDivisionError, KeyError) as err:  # KeyError: act_layer=bogus
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise DaliFlError(f"cannot build {spec.name} for {img_size}px images with --model-kwargs "
                              f"{spec.kwargs} ({first})") from None
        check_no_running_stats(model, spec.name)
        check_flag_kwargs(model, spec)
        if spec.lora:
            model = apply_lora(model, spec)
    return model


def check_no_running_stats(model: nn.Module, name: str) -> None:
    """Refuse models whose training moves buffers (BatchNorm's running statistics), which no client exchanges.

    Clients exchange parameters only: a running mean would be whatever the last client left, unaveraged,
    unclipped and unnoised under DP, and missing from the checkpoint, so a resume would not continue the run.
    """
    norms = [n for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if norms:
        raise DaliFlError(f"--model {name} keeps BatchNorm running statistics ({len(norms)} layers, e.g. {norms[0]}), "
                          "which dali-fl neither averages nor checkpoints (clients exchange parameters only); use a "
                          "model without BatchNorm, e.g. vit_tiny_patch16_224 or deit_small_patch16_224")


def check_flag_kwargs(model: nn.Module, spec: ModelSpec) -> None:
    """A kwarg whose default in the model's signature is True or False takes only true or false: timm reads any
    other value by its truth, so qkv_bias=maybe built a model with biases while config.json recorded "maybe"."""
    import inspect

    params = inspect.signature(type(model).__init__).parameters
    for key, value in spec.kwargs.items():
        if key in params and isinstance(params[key].default, bool) and not isinstance(value, bool):
            raise DaliFlError(f"--model-kwargs {key}={value} must be true or false")


def head_names(model: nn.Module) -> list[str]:
    """The classifier head(s): timm names one, or two for distilled ViTs (head, head_dist)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier", "head") if isinstance(cfg, dict) else "head"
    return [heads] if isinstance(heads, str) else list(heads)


def lora_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The Linear layers the targets name (a name, a dotted suffix, or a regex matched whole), the head(s) aside.

    Linear only: a Conv2d (the patch embedding's `proj`) has 4-d factors that B @ A cannot fold (FedEx, stack).
    """
    heads = head_names(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(n == h or n.startswith(h + ".") for h in heads)]

    def named(target: str, name: str) -> bool:
        return bool(re.fullmatch(target, name)) if _is_regex(target) else name == target or name.endswith("." + target)

    for target in targets:
        if not any(named(target, n) for n in names):
            raise DaliFlError(f"--lora-targets {target!r} matches no Linear layer outside the head; some that exist: "
                              + ", ".join(names[:6]))
    return [n for n in names if any(named(t, n) for t in targets)]


def apply_lora(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Wrap the model with peft LoRA on the target modules; the classifier head stays trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, modules_to_save=head_names(model),
                        target_modules=lora_modules(model, spec.lora_targets), lora_dropout=0.0)
    model = get_peft_model(model, config)
    if spec.freeze_lora_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model


def _is_regex(target: str) -> bool:
    return any(c in target for c in "*()[]|\\+?")


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the tensors clients train and exchange (all for FedAvg; LoRA and head for FedLoRA)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached views of the trainable tensors (no copy)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_state_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model's parameters in place (no new modules, no deep copy)."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise DaliFlError(f"checkpoint tensors do not fit this model (e.g. {missing[0]}); same --model and --alg?")
    wrong = [n for n, v in state.items() if tuple(v.shape) != tuple(params[n].shape)]
    if wrong:
        raise DaliFlError(f"checkpoint tensor {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model's "
                          f"has {tuple(params[wrong[0]].shape)}; the checkpoint does not belong to this run")
    for name, value in state.items():
        params[name].copy_(value)
