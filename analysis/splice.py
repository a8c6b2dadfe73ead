"""Splicing an SAE into a model's forward pass, and the edits interventions make on its latents.

Every hook here is installed with `model.hooks(...)`, TransformerBridge's context manager, so the
hooks are removed when the block exits, also when the forward pass (or the caller) raises.

Splice modes at one hook, on the positions selected by `mask` (others pass through unchanged):

* without the error term: the activation x is replaced by x̂ = decode(edit(encode(x)));
* with the error term: x + (decode(edit(f)) − decode(f)), i.e. x̂_edit + (x − x̂). Written as a
  difference of two decodes of the same code path, so with no edit the model's output is exactly
  the clean one (x̂ + (x − x̂) would not be, in floating point);
* zero-ablation: x is replaced by 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

EditOp = Literal["ablate", "clamp", "scale"]


@dataclass(frozen=True)
class LatentEdit:
    """One edit on a set of latents: ablate (set to 0), clamp (set to `value`) or scale (× `value`)."""

    op: EditOp
    latents: tuple[int, ...]
    value: float = 0.0

    def apply(self, f: np.ndarray) -> None:
        """Edit latent codes [tokens, n_latents] in place."""
        idx = list(self.latents)
        if self.op == "ablate":
            f[:, idx] = 0.0
        elif self.op == "clamp":
            f[:, idx] = self.value
        elif self.op == "scale":
            f[:, idx] *= self.value
        else:
            raise ValueError(f"unknown edit {self.op!r}; use 'ablate', 'clamp' or 'scale'")


@dataclass(frozen=True)
class Steering:
    """Add `coeff · W_dec[latent]` to the activation at every spliced position."""

    latent: int
    coeff: float


def decoder_rows(sae: Any) -> np.ndarray:
    """The raw (not normalised) decoder rows [n_latents, d] of an SAE, in activation units."""
    from sae.base import arch_module, optional

    w = optional(arch_module(sae.config.arch), "decoder_rows")(sae.config, sae.params)
    return np.asarray(w, dtype=np.float32)


def _bucket(n: int) -> int:
    """Rows padded to a power of two: the SAE's jitted functions then compile for a few shapes only."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


def encode_rows(sae: Any, x: np.ndarray) -> np.ndarray:
    """`sae.encode` of [tokens, d] with the token count padded to a bucket (padding rows dropped)."""
    n = len(x)
    xp = np.zeros((_bucket(n), x.shape[1]), dtype=np.float32)
    xp[:n] = x
    return np.array(sae.encode(xp)[:n], dtype=np.float32)


def decode_rows(sae: Any, f: np.ndarray) -> np.ndarray:
    n = len(f)
    fp = np.zeros((_bucket(n), f.shape[1]), dtype=np.float32)
    fp[:n] = f
    return np.array(sae.decode(fp)[:n], dtype=np.float32)


def validate_latents(sae: Any, latents: Sequence[int], what: str = "latent") -> None:
    n = int(sae.n_latents)
    bad = [i for i in latents if not 0 <= int(i) < n]
    if bad:
        raise ValueError(
            f"{what} id(s) {bad} out of range: this SAE has {n} latents, ids 0..{n - 1}; "
            "pick ids from `saewb features` or the app"
        )


def validate_edits(sae: Any, edits: Sequence[LatentEdit], steering: Sequence[Steering]) -> None:
    for edit in edits:
        if edit.op not in ("ablate", "clamp", "scale"):
            raise ValueError(f"unknown edit {edit.op!r}; use 'ablate', 'clamp' or 'scale'")
        if not edit.latents:
            raise ValueError(f"{edit.op} edit names no latent; give at least one latent id")
        validate_latents(sae, edit.latents, what=f"{edit.op} latent")
    validate_latents(sae, [s.latent for s in steering], what="steering latent")


def splice_positions(sae: Any, act: Any, mask: Any = None) -> Any:
    """Bool [batch, pos]: where an SAE is spliced: ``mask`` (None: everywhere) less the positions whose
    norm is above the SAE's ``outlier_cutoff`` (the attention sinks it was trained without)."""
    import torch

    sel = torch.ones(act.shape[:-1], dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if sel.shape != act.shape[:-1]:
        raise ValueError(f"splice mask has shape {tuple(sel.shape)}, activations {tuple(act.shape[:-1])}")
    cutoff = getattr(sae, "outlier_cutoff", None)
    if cutoff is not None:
        sel = sel & (act.detach().to(torch.float32).norm(dim=-1) <= cutoff).to(sel.device)
    return sel


def sae_hook_fn(
    sae: Any,
    *,
    error_term: bool,
    edits: Sequence[LatentEdit] = (),
    steering: Sequence[Steering] = (),
    mask: Any = None,
) -> Callable[[Any, Any], Any]:
    """A forward hook that splices `sae` (with optional edits) into the activation [batch, pos, d].

    `mask` is a bool tensor [batch, pos] of the positions to splice (None: all). Positions outside
    it, such as padding and the special tokens the SAE never saw in training, pass through, and so
    do the outliers it was trained without (``splice_positions``).
    """
    import torch

    validate_edits(sae, edits, steering)
    steer_vec = None
    if steering:
        rows = decoder_rows(sae)
        steer_vec = sum(float(s.coeff) * rows[s.latent] for s in steering)

    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if act.shape[-1] != sae.d:
            raise ValueError(
                f"the SAE expects activations of width {sae.d} but hook {getattr(hook, 'name', '?')} "
                f"has width {act.shape[-1]}; splice it at the hook it was trained on"
            )
        sel = splice_positions(sae, act, mask)
        if not bool(sel.any()):
            return act
        x = act[sel].detach().to(torch.float32).cpu().numpy()
        if error_term and not edits:
            new = x.copy()  # exact: no edit means no change
        else:
            f = encode_rows(sae, x)
            if error_term:
                f_edit = f.copy()
                for edit in edits:
                    edit.apply(f_edit)
                new = x + (decode_rows(sae, f_edit) - decode_rows(sae, f))
            else:
                for edit in edits:
                    edit.apply(f)
                new = decode_rows(sae, f)
        if steer_vec is not None:
            new = new + steer_vec
        out = act.clone()
        out[sel] = torch.from_numpy(np.array(new, dtype=np.float32)).to(act.dtype).to(act.device)
        return out

    return hook


def random_error_hook_fn(sae: Any, mask: Any = None, seed: int = 0) -> Callable[[Any, Any], Any]:
    """A forward hook that adds, on each masked position, an error as large as the SAE's there but in
    a uniformly random direction: x + ‖x̂ − x‖·u (Gurnee 2024). Comparing its ΔCE with the SAE's says
    how much worse the SAE's errors are than their size alone explains."""
    import torch

    rng = np.random.default_rng(seed)

    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        sel = splice_positions(sae, act, mask)
        if not bool(sel.any()):
            return act
        x = act[sel].detach().to(torch.float32).cpu().numpy()
        err = np.linalg.norm(decode_rows(sae, encode_rows(sae, x)) - x, axis=1, keepdims=True)
        u = rng.standard_normal(x.shape)
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        out = act.clone()
        out[sel] = torch.from_numpy((x + err * u).astype(np.float32)).to(act.dtype).to(act.device)
        return out

    return hook


def zero_ablate_hook_fn(mask: Any = None) -> Callable[[Any, Any], Any]:
    """A forward hook that sets the activation to 0 on the masked positions (all when mask is None)."""
    import torch

    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if mask is None:
            return torch.zeros_like(act)
        return act.masked_fill(mask.to(torch.bool).unsqueeze(-1), 0.0)

    return hook


@contextmanager
def hooked(model: Any, hooks: Sequence[tuple[str, Callable[[Any, Any], Any]]]) -> Iterator[Any]:
    """Install forward hooks for the duration of the block; they are removed even on exceptions."""
    with model.hooks(fwd_hooks=list(hooks)):
        yield model


@contextmanager
def spliced(
    model: Any,
    hook: str,
    sae: Any,
    *,
    error_term: bool = False,
    edits: Sequence[LatentEdit] = (),
    steering: Sequence[Steering] = (),
    mask: Any = None,
) -> Iterator[Any]:
    """`with spliced(model, hook, sae): model(tokens)` runs the model with the SAE spliced in."""
    fn = sae_hook_fn(sae, error_term=error_term, edits=edits, steering=steering, mask=mask)
    with hooked(model, [(hook, fn)]):
        yield model


@contextmanager
def zero_ablated(model: Any, hook: str, mask: Any = None) -> Iterator[Any]:
    with hooked(model, [(hook, zero_ablate_hook_fn(mask))]):
        yield model


def active_hook_count(model: Any, hook: str) -> int:
    """How many forward hooks sit on a hook point now (0 once every splice has exited)."""
    point = model.hook_dict[hook]
    return len(point._forward_hooks)
