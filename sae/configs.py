"""The config dataclasses: `TrainConfig` and each architecture's hyper-parameters.

They live here, apart from their architecture modules (``sae/<arch>.py`` re-exports its own as
``Config``), because this module imports no JAX: the `saewb train` flags and
``docs/config_reference.md`` (``scripts/gen_config_reference.py``) are built from these dataclasses
(``dataclasses.fields`` + ``typing.get_type_hints``; a field's help is the docstring under it), and
`saewb --help` stays fast. Choice fields are ``Literal[...]``: the CLI offers exactly those values.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import textwrap
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Literal, get_args

ComputeDtype = Literal["float32", "bfloat16"]
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)


# --- training, every architecture (sae/trainer.py)
@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every architecture."""

    introduced: ClassVar[dict[str, object]] = {"outlier_ratio": None}

    train_tokens: int = 2_000_000
    """Tokens to train on (steps = train_tokens // batch_size)."""
    batch_size: int = None  # type: ignore[assignment]  # resolved to an int in __post_init__
    """Tokens per step; None (the default) is resolved when the config is made (``default_batch_size``):
    4096, halved for short runs until they have at least 480 steps, not below 256."""
    seed: int = 0
    """Seeds the init and the data order."""
    lr: float | None = None
    """Peak learning rate; None means the default rule (``default_lr``): 2e-4 / sqrt(n_latents / 2^14)
    for long runs, raised for short runs (measured grid: docs/learning_rate.md)."""
    warmup_steps: int = 1000
    """Linear warmup length, capped at a tenth of the run."""
    decay_frac: float = 0.2
    """Linear decay to 0 over this final fraction of the steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    dead_window_tokens: int | None = None
    """A latent is dead after this many tokens without firing; None: min(10M, 5% of the run)."""
    dense_threshold: float = 0.1
    """A latent is dense when it fires on more than this fraction of tokens."""
    init_sample_tokens: int = 16384
    """Tokens used to estimate the input scale and the geometric-median bias."""
    outlier_ratio: float | None = 10.0
    """Tokens whose norm is above this multiple of the init sample's median token norm are left out:
    of training (such a row of a batch is replaced by one of the batch's typical rows, so batches keep
    their shape) and of the SAE's splice and held-out metrics. These are the attention sinks ("massive
    activations") of mid-layer LM residual streams: 44 of 122k held-out tokens at SmolLM2 blocks.15, at
    ~150× the median norm, held 80% of the variance and drove the loss. None keeps every token."""
    log_every: int = 50
    """Steps between metric rows."""
    ckpt_every: int = 500
    """Steps between checkpoints (a final one is always written)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    mesh_data: int = 1
    """Devices on the mesh's "data" axis (the batch is split over them); 1 x 1 is one device. With
    several processes and a 1 x 1 mesh, every device goes on this axis."""
    mesh_model: int = 1
    """Devices on the mesh's "model" axis (the latent axis of the weights, Adam moments and
    per-latent state is split over them; top-k runs shard-local then merges)."""
    compute_dtype: ComputeDtype = "float32"
    """Forward/backward dtype: "float32" or "bfloat16" (master weights, optimiser and state stay
    float32)."""

    def __post_init__(self) -> None:
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", default_batch_size(self.train_tokens))

    def validate(self, d: int | None = None) -> None:
        from sae.base import check_ranges

        check_ranges(self)  # every field's range (sae/base.py RANGES), then how fields fit together
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.train_tokens < self.batch_size:
            raise ValueError(
                f"train_tokens={self.train_tokens} is less than one batch of {self.batch_size}; "
                "raise --train-tokens or lower --batch-size"
            )
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"decay_frac must be in [0, 1], got {self.decay_frac}")
        if self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError("log_every and ckpt_every must be >= 1")
        if self.mesh_data < 1 or self.mesh_model < 1:
            raise ValueError(
                f"mesh_data and mesh_model must be >= 1, got {self.mesh_data} x {self.mesh_model}"
            )
        if self.batch_size % self.mesh_data:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by mesh_data={self.mesh_data}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")

    @property
    def total_steps(self) -> int:
        return self.train_tokens // self.batch_size

    def peak_lr(self, n_latents: int) -> float:
        """``lr``, or the default rule's value for this run."""
        return self.lr if self.lr is not None else default_lr(n_latents, self.total_steps)


MAX_DEFAULT_BATCH = 4096
"""The default batch of runs long enough to have MIN_DEFAULT_STEPS steps at it."""
MIN_DEFAULT_BATCH = 256
MIN_DEFAULT_STEPS = 480
"""Short runs get smaller batches until they have this many steps: at 250k tokens and n 2048, batch 512
(488 steps) against 4096 (61 steps) took the held-out FVU from 0.1739 to 0.1344 on MiniLM, 0.1135 to
0.0862 on tiny-lm and 0.1727 to 0.1264 on SmolLM2, and the dead fraction from 4.5% to 1.1%, 18.6% to
3.0% and 14.5% to 10.7% (held-out; docs/learning_rate.md)."""


def default_batch_size(train_tokens: int) -> int:
    """The default batch: the largest power of two from MIN_DEFAULT_BATCH to MAX_DEFAULT_BATCH that gives
    the run at least MIN_DEFAULT_STEPS steps (MIN_DEFAULT_BATCH if none does, but never more tokens than
    the run has)."""
    batch = MAX_DEFAULT_BATCH
    while batch > MIN_DEFAULT_BATCH and train_tokens // batch < MIN_DEFAULT_STEPS:
        batch //= 2
    return max(1, min(batch, int(train_tokens)))


LONG_RUN_LR = 2e-4
"""Peak lr at n = 2^14 for long runs (Gao et al.; the reference sheet), scaled by 1/sqrt(n / 2^14)."""
SHORT_RUN_LR = 1e-2
"""The measured best peak lr at SHORT_RUN_STEPS steps: at n = 2048 on all three caches of the grid,
and at n = 8192 on MiniLM (where 5e-3 was worse)."""
SHORT_RUN_STEPS = 61
"""250k tokens in batches of 4096."""
SHORT_RUN_EXPONENT = 0.5
"""lr ∝ steps^-0.5 (fitted: 5e-3 at 244 steps is the demo cell's default, held-out FVU 0.1086)."""
MAX_DEFAULT_LR = 1e-2
"""No default peak lr above this, however short the run (2e-2 already lost 0.015 to 0.1 FVU and a
third to two thirds of the latents at n = 2048 in the grid)."""


def default_lr(n_latents: int, total_steps: int) -> float:
    """The default peak learning rate of a run with ``n_latents`` latents and ``total_steps`` steps.

    The larger of two rules, capped at MAX_DEFAULT_LR: the long-run rule 2e-4 / sqrt(n / 2^14) (tuned
    on runs of hundreds of millions of tokens), and a short-run rule fitted to the grid of
    ``benchmarks/lr_grid.py`` (docs/learning_rate.md): SHORT_RUN_LR · sqrt(SHORT_RUN_STEPS / steps).
    A short run needs a larger step to move its weights far from the init in the steps it has; in
    the grid its best lr did not fall with n (1e-2 at n = 2048 and 8192), so n enters only through
    the long-run rule, which takes over after ~20k (n = 2048) to ~150k (n = 16384) steps. The batch
    size enters through the steps (a fixed token budget in larger batches is fewer steps).
    """
    n = max(int(n_latents), 1)
    steps = max(int(total_steps), 1)
    long_run = LONG_RUN_LR / math.sqrt(n / 2**14)
    short_run = SHORT_RUN_LR * (SHORT_RUN_STEPS / steps) ** SHORT_RUN_EXPONENT
    return min(MAX_DEFAULT_LR, max(long_run, short_run))


# --- topk (sae/topk.py)
@dataclass(frozen=True)
class TopKConfig:
    """TopK SAE hyper-parameters (defaults from the reference sheet unless noted)."""

    arch: ClassVar[str] = "topk"
    introduced: ClassVar[dict[str, object]] = {
        "init_fire_ratio": None,
        "k_aux_min_frac": None,
        "resample_every_frac": 0.0,
        "resample_mode": "inputs",
    }
    """The values runs saved before these fields existed trained with (``sae.base.saved_config``)."""

    n_latents: int = 4096
    """Number of latents n."""
    k: int = 32
    """Active latents per token."""
    k_aux: int | None = None
    """Latents used by AuxK; None means d/2, or ``k_aux_min_frac`` · n if that is more (capped at the
    number of dead latents)."""
    k_aux_min_frac: float | None = 1 / 16
    """With ``k_aux`` None, AuxK uses at least this fraction of the latents (1/16: from n > 8d on it is
    more than d/2); None: d/2 alone. At n 8192 on 250k MiniLM tokens 512 latents instead of 192 left
    3.6% dead over the train split instead of 9.3% (docs/learning_rate.md). 1/4 leaves fewer still
    (SmolLM2 n 8192: 1.55% against 2.81%) but makes a step with dead latents 1.5-1.9× slower."""
    aux_coef: float = 0.25
    """Weight of the AuxK loss. 1/4, not the reference 1/32, by measurement (docs/learning_rate.md): at
    the default batch it left 0.1-1.4% of latents dead where 1/32 left 0.9-3.0% (250k and 1M tokens,
    three caches), and 18% where 1/32 left 47% at n 8192, for +0.0007 to +0.002 held-out FVU."""
    multi_topk: bool = False
    """Add ‖x − x̂_{4k}‖²/8 so k can be raised at inference."""
    decoder: Literal["free", "unit"] = "free"
    """"free" (SAELens: no norm constraint, rows init at norm 0.1, top-k on pre·‖W_dec,i‖; the default,
    by measurement, see the module doc) or "unit" (unit-norm rows + gradient projection)."""
    init_dec_norm: float | None = None
    """Norm of the initial decoder rows; None means 1.0 for "unit" and 0.1 for "free"."""
    rescale_by_decoder_norm: bool = True
    """Choose the top k on pre · ‖W_dec,i‖ (only matters for decoder="free")."""
    init_w: Literal["random", "data"] = "random"
    """Decoder rows (and encoder columns) at init: "random" directions or "data" (normalised centred
    samples of the init sample, so every latent starts where the data is)."""
    resample_every_frac: float = 0.05
    """Resample dead latents (``resample_mode``) at each multiple of this fraction of training that
    leaves a whole period to train; 0 disables. 0.05 (the default dead window) with "rebias" by
    measurement (docs/learning_rate.md: tiny-lm n 8192 on 250k tokens, 27% dead over the train split →
    1.4%, FVU −0.002; every 0.1: 2.8%)."""
    resample_mode: Literal["inputs", "rebias"] = "rebias"
    """"rebias" (the default): keep each dead latent's directions and Adam moments and reset only its
    encoder bias so its pre-activation is positive on ratio·k/n of the batch again (the
    ``init_fire_ratio`` rule; ratio 1 when that is None). AuxK's values are ReLU'd, so it gives a latent
    whose pre-activation is negative on every token no gradient at all: such latents stay dead without
    it. "inputs": Anthropic's recipe (``common.resample_dead_rows``: new directions from badly
    reconstructed inputs, b_enc = 0, moments zeroed), which did not lower the dead fraction here."""
    init_fire_ratio: float | None = 1.0
    """Each latent's encoder bias starts where its pre-activation is positive on this ratio × k/n of the
    init sample, so every latent starts with the same chance to fire; None: a zero bias (the reference
    init, where the top k go to the latents best aligned with the widest directions). 1 by measurement
    (docs/learning_rate.md): fewer dead latents in every cell (MiniLM n 8192, 250k tokens: 2.5% over
    the train split instead of 9.3%) for a held-out FVU −0.002 on MiniLM and +0.0003 to +0.0012 on
    tiny-lm."""

    def validate(self, d: int | None = None) -> None:
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(
                f"k={self.k} must be between 1 and n_latents={self.n_latents}; lower --k or raise --n-latents"
            )
        if self.multi_topk and 4 * self.k > self.n_latents:
            raise ValueError(f"multi_topk needs 4k={4 * self.k} <= n_latents={self.n_latents}")
        if self.decoder not in ("unit", "free"):
            raise ValueError(f"decoder must be 'unit' or 'free', got {self.decoder!r}")
        if self.k_aux is not None and not 1 <= self.k_aux <= self.n_latents:
            raise ValueError(f"k_aux={self.k_aux} must be between 1 and n_latents={self.n_latents}")
        validate_dead_latent_fields(self)


def validate_dead_latent_fields(cfg: Any) -> None:
    """The checks of the dead-latent fields TopK and BatchTopK share (``k_aux_min_frac``,
    ``init_fire_ratio``, ``resample_every_frac``, ``resample_mode``); HierarchicalTopK has none of them."""
    if not 0 <= getattr(cfg, "resample_every_frac", 0.0) < 1:
        raise ValueError(f"resample_every_frac must be in [0, 1), got {cfg.resample_every_frac}")
    if getattr(cfg, "resample_mode", "inputs") not in ("inputs", "rebias"):
        raise ValueError(f"resample_mode must be 'inputs' or 'rebias', got {cfg.resample_mode!r}")
    ratio = getattr(cfg, "init_fire_ratio", None)
    if ratio is not None and not 0 < ratio * cfg.k <= cfg.n_latents:
        raise ValueError(
            f"init_fire_ratio={ratio} must be positive and at most n_latents/k={cfg.n_latents / cfg.k:g}; "
            "or none for a zero encoder bias"
        )
    min_frac = getattr(cfg, "k_aux_min_frac", None)
    if min_frac is not None and not 0 < min_frac <= 1:
        raise ValueError(f"k_aux_min_frac must be in (0, 1] or none, got {min_frac}")


# --- relu_l1 (sae/relu_l1.py)
@dataclass(frozen=True)
class ReluL1Config:
    """ReLU + L1 hyper-parameters."""

    arch: ClassVar[str] = "relu_l1"

    n_latents: int = 4096
    """Number of latents n."""
    l1_coef: float = 5.0
    """λ (with inputs scaled to E‖x‖ = √d, Anthropic's value is ~5)."""
    l1_warmup_frac: float = 0.05
    """λ ramps linearly from 0 over this fraction of the steps."""
    variant: Literal["april", "classic"] = "april"
    """"april" (decoder-norm-weighted L1, free decoder) or "classic" (unit norm + resampling)."""
    init_dec_norm: float = 0.1
    """Initial decoder-row norm for the April variant."""
    resample_every_frac: float = 0.25
    """Classic variant: resample dead latents at these fractions of training (0 disables)."""

    def validate(self, d: int | None = None) -> None:
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if self.l1_coef < 0:
            raise ValueError(f"l1_coef must be >= 0, got {self.l1_coef}")
        if self.variant not in ("april", "classic"):
            raise ValueError(f"variant must be 'april' or 'classic', got {self.variant!r}")
        if not 0 <= self.resample_every_frac < 1:
            raise ValueError(f"resample_every_frac must be in [0, 1), got {self.resample_every_frac}")


# --- gba (sae/gba.py)
@dataclass(frozen=True)
class GBAConfig:
    """GBA / BA hyper-parameters (paper defaults, except the update period, γ, the target frequencies,
    the initial biases and the two-sided bias rule: see sae/gba.py)."""

    arch: ClassVar[str] = "gba"
    retired: ClassVar[tuple[str, ...]] = ("update_every",)
    """Fields of earlier versions, dropped when a saved config is read (``sae.base.make_config``):
    ``update_every`` (steps) became ``update_tokens``; the SAE's inference form never used it."""
    introduced: ClassVar[dict[str, object]] = {"init_b": "zero", "bias_rule": "paper", "tied": True}
    """The values runs saved before ``init_b``, ``bias_rule`` and ``tied`` existed trained with
    (``sae.base.saved_config``)."""

    n_latents: int = 4096
    """Number of neurons."""
    n_groups: int = 10
    """K; 1 gives plain bias adaptation (BA)."""
    target_l0: float = 32.0
    """Expected L0 n·mean(p_k): sets the highest target frequency when htf is None."""
    htf: float | None = None
    """Highest target frequency (group 0); None: the one whose ladder down to ltf has expected L0
    target_l0."""
    ltf: float = 1e-3
    """Lowest target frequency (group K−1)."""
    gamma: float = 0.02
    """Bias step size γ. 0.02 (the paper: 0.01) by measurement (docs/learning_rate.md): the same SAE at
    n 2048, and at n 8192 on SmolLM2 (250k tokens) L0 33.6 with 0.02% dead where 0.01 left L0 29.6 and 3.5%."""
    update_tokens: int = 512
    """Tokens between bias updates (the paper's T in steps times its batch; at least one step, so every
    step at the default batches). 512 (was 8192) with ``band`` 1 by measurement (docs/learning_rate.md):
    a 250k-token run makes ~490 updates instead of 30, enough for the biases to follow a dictionary
    that moves under them; 8192 tokens with band 1.5 left L0 at 10-21 for a target of 32 on three caches."""
    freq_eps: float = 1e-6
    """A neuron whose frequency is below this counts as never fired."""
    bias_rule: Literal["paper", "two_sided"] = "two_sided"
    """"paper": lower b_m when freq_m > p_k, raise it only when the neuron never fired, so the targets
    are ceilings and L0 ratchets below them on long runs; "two_sided": lower when freq_m > p_k·band,
    raise by γ·r̄_k when freq_m < p_k / band (never-fired neurons included), so each neuron holds its
    target frequency."""
    band: float = 1.0
    """Tolerance of the "two_sided" rule: no bias step while p_k / band <= freq_m <= p_k·band. 1 (was 1.5)
    by measurement: with a tolerance the biases drift to the edge the dictionary pushes them to (L0 at
    ~target / band at 250k tokens), without one each neuron steps around its target."""
    activation: Literal["relu", "jumprelu"] = "jumprelu"
    """φ: "jumprelu" (u·1[u + b > 0], the paper's choice for LLMs; the default by measurement,
    docs/learning_rate.md) or "relu" (ReLU(u + b): the bias also shrinks every activation)."""
    init_a: float = 0.05
    """Initial output scale a_m."""
    init_w: Literal["random", "data"] = "data"
    """W at init: "random" unit rows or "data" (normalised centred samples)."""
    train_b_pre: bool = False
    """Let Adam move b_pre; False keeps it at its init (see the measurements in the module doc)."""
    init_b_pre: Literal["geometric_median", "zero"] = "geometric_median"
    """b_pre at init: "geometric_median" of the sample or "zero"."""
    init_b: Literal["quantile", "zero"] = "quantile"
    """Biases at init: "quantile" (each neuron fires at its group's target frequency on the init
    sample, so L0 starts at its target) or "zero" (the paper: every neuron starts firing on about
    half the tokens, and ~30 updates at γ 0.01 do not bring them down in a 250k-token run)."""
    tied: bool = False
    """True: the paper's model, one unit row w_m both encodes and decodes. False (the default, by
    measurement): the encoder has unit rows of its own (unit norm too, so the [−1, 0] bias range keeps its
    meaning; they start equal to W). Held-out FVU untied / tied: 0.1893 / 0.1986 (MiniLM n 2048, 250k
    tokens), 0.1596 / 0.1777 (tiny-lm), 0.1632 / 0.1682 (MiniLM n 4096, 1M), 0.1054 / 0.1262 (MiniLM
    n 2048, 20M; docs/learning_rate.md)."""

    def validate(self, d: int | None = None) -> None:
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if not 1 <= self.n_groups <= self.n_latents:
            raise ValueError(f"n_groups={self.n_groups} must be between 1 and n_latents={self.n_latents}")
        if self.htf is not None and not 0 < self.ltf <= self.htf <= 1:
            raise ValueError(f"need 0 < ltf <= htf <= 1, got ltf={self.ltf}, htf={self.htf}")
        if self.htf is None:
            lo, hi = gba_l0_range(self)
            if not lo <= self.target_l0 <= hi:
                raise ValueError(
                    f"target_l0={self.target_l0:g} is out of reach of n_latents={self.n_latents}, "
                    f"n_groups={self.n_groups}, ltf={self.ltf:g} (expected L0 between {lo:.3g} and {hi:.3g}); "
                    "change --target-l0 or --ltf, or give --htf"
                )
        if self.init_w not in ("random", "data"):
            raise ValueError(f"init_w must be 'random' or 'data', got {self.init_w!r}")
        if self.init_b_pre not in ("geometric_median", "zero"):
            raise ValueError(f"init_b_pre must be 'geometric_median' or 'zero', got {self.init_b_pre!r}")
        if self.activation not in ("relu", "jumprelu"):
            raise ValueError(f"activation must be 'relu' or 'jumprelu', got {self.activation!r}")
        if self.update_tokens < 1:
            raise ValueError(f"update_tokens must be >= 1, got {self.update_tokens}")
        if self.bias_rule not in ("paper", "two_sided"):
            raise ValueError(f"bias_rule must be 'paper' or 'two_sided', got {self.bias_rule!r}")

    def resolved_htf(self) -> float:
        """``htf``, or the one whose geometric ladder down to ``ltf`` has expected L0 ``target_l0``."""
        if self.htf is not None:
            return self.htf
        lo, hi = self.ltf, 1.0
        for _ in range(60):  # the expected L0 grows with htf: bisect
            mid = (lo + hi) / 2
            if gba_expected_l0(self, mid) < self.target_l0:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2


def gba_group_frequencies(cfg: GBAConfig, htf: float) -> list[float]:
    """p_k, geometric from htf down to ltf over the K groups (K = 1: htf)."""
    k = cfg.n_groups
    if k == 1:
        return [htf]
    return [htf * (cfg.ltf / htf) ** (g / (k - 1)) for g in range(k)]


def gba_expected_l0(cfg: GBAConfig, htf: float) -> float:
    """n·mean(p) over the neurons (group g holds the neurons m with m·K // n = g)."""
    p = gba_group_frequencies(cfg, htf)
    k, n = cfg.n_groups, cfg.n_latents
    # group g holds the m with g·n/K <= m < (g+1)·n/K: ceil((g+1)·n/K) − ceil(g·n/K) of them
    return sum(p[g] * (-(-(g + 1) * n // k) + (-g * n // k)) for g in range(k))


def gba_l0_range(cfg: GBAConfig) -> tuple[float, float]:
    """The expected L0s ``target_l0`` can reach (htf from ltf to 1)."""
    return gba_expected_l0(cfg, cfg.ltf), gba_expected_l0(cfg, 1.0)


# --- batchtopk (sae/batchtopk.py)
@dataclass(frozen=True)
class BatchTopKConfig:
    """BatchTopK hyper-parameters (defaults from the reference sheet unless noted)."""

    arch: ClassVar[str] = "batchtopk"
    introduced: ClassVar[dict[str, object]] = {
        "init_fire_ratio": None,
        "k_aux_min_frac": None,
        "resample_every_frac": 0.0,
        "resample_mode": "inputs",
    }
    """The values runs saved before these fields existed trained with (``sae.base.saved_config``; their
    records hold the AuxK weight they used, 1/32 then)."""

    n_latents: int = 4096
    """Number of latents n."""
    k: int = 32
    """Mean active latents per token: each batch keeps its top k·B pre-activations."""
    candidates: int = 4
    """c: per-token candidates c·k for the batch selection (a token keeps at most c·k; c >= n/k is exact)."""
    k_aux: int | None = None
    """Latents used by AuxK; None means d/2, or ``k_aux_min_frac`` · n if that is more (capped at the
    number of dead latents)."""
    k_aux_min_frac: float | None = 1 / 16
    """With ``k_aux`` None, AuxK uses at least this fraction of the latents; None: d/2 alone."""
    aux_coef: float = 0.25
    """Weight of the AuxK loss. 1/4 (the reference's is 1/32) with the three fields below, TopK's
    dead-latent defaults, by measurement (docs/learning_rate.md): at n 8192 on 250k tokens they took the
    dead fraction over the train split from 56% to 0.5% (tiny-lm) and from 24% to 0.3% (MiniLM), and
    Matryoshka's from 53% to 1.8% and 18% to 0.6%; where few died before (n 2048, the demo cell) they cost
    0.0004 to 0.003 held-out FVU (BatchTopK) and 0.002 to 0.006 (Matryoshka)."""
    init_fire_ratio: float | None = 1.0
    """Each latent's encoder bias starts where its pre-activation is positive on this ratio × k/n of the
    init sample; None: a zero bias."""
    resample_every_frac: float = 0.05
    """Resample dead latents (``resample_mode``) at each multiple of this fraction of training that
    leaves a whole period to train; 0 disables."""
    resample_mode: Literal["inputs", "rebias"] = "rebias"
    """"rebias": a dead latent keeps its directions and Adam moments and gets the encoder bias that
    makes it fire on ratio·k/n of the batch again; "inputs": Anthropic's recipe (see TopKConfig)."""
    decoder: Literal["free", "unit"] = "free"
    """"free" (SAELens: no norm constraint, rows init at norm 0.1, top-k on pre·‖W_dec,i‖; the default,
    by measurement, see sae/batchtopk.py) or "unit" (unit-norm rows + gradient projection)."""
    init_dec_norm: float | None = None
    """Norm of the initial decoder rows; None means 1.0 for "unit" and 0.1 for "free"."""
    rescale_by_decoder_norm: bool = True
    """Choose the top k on pre · ‖W_dec,i‖ (only matters for decoder="free")."""
    threshold_decay: float = 0.999
    """EMA decay of the inference threshold θ."""
    threshold_start_step: int = 1000
    """Track θ from this step on (or from threshold_start_frac of the run, whichever is first)."""
    threshold_start_frac: float = 0.75
    """Track θ from this fraction of the run on (short runs; see threshold_start_step)."""

    def validate(self, d: int | None = None) -> None:
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(
                f"k={self.k} must be between 1 and n_latents={self.n_latents}; lower --k or raise --n-latents"
            )
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.decoder not in ("unit", "free"):
            raise ValueError(f"decoder must be 'unit' or 'free', got {self.decoder!r}")
        if self.k_aux is not None and not 1 <= self.k_aux <= self.n_latents:
            raise ValueError(f"k_aux={self.k_aux} must be between 1 and n_latents={self.n_latents}")
        if not 0 < self.threshold_decay < 1:
            raise ValueError(f"threshold_decay must be in (0, 1), got {self.threshold_decay}")
        if not 0 <= self.threshold_start_frac <= 1:
            raise ValueError(f"threshold_start_frac must be in [0, 1], got {self.threshold_start_frac}")
        validate_dead_latent_fields(self)


# --- jumprelu (sae/jumprelu.py)
@dataclass(frozen=True)
class JumpReLUConfig:
    """JumpReLU hyper-parameters (defaults from the reference sheet unless noted)."""

    arch: ClassVar[str] = "jumprelu"
    introduced: ClassVar[dict[str, object]] = {"threshold_lr_scale": 1.0, "dead_preact_coef": 0.0}
    """Fields added after runs were saved, with the value those runs trained with (see MatryoshkaConfig)."""

    n_latents: int = 4096
    """Number of latents n."""
    l0_coef: float = 2e-3
    """λ: weight of the L0 penalty (the reconstruction term is the FVU)."""
    l0_warmup_frac: float = 0.05
    """λ ramps linearly from 0 over this fraction of the steps."""
    target_l0: float | None = None
    """With a target, the penalty is (L0/target_l0 − 1)² instead of L0 (use l0_coef ≈ 1)."""
    bandwidth: float = 0.001
    """ε: width of the rectangle kernel of the straight-through pseudo-derivatives."""
    init_threshold: float = 0.001
    """Initial θ of every latent (inputs scaled to E‖x‖² = 1)."""
    threshold_lr_scale: float | None = None
    """θ's Adam step is the lr times this; None: min(1, bandwidth / peak lr), so θ never steps further
    than ε. Adam moves θ by ~lr per step whatever its gradient, and a step much wider than ε leaves θ
    above every pre-activation, where no gradient reaches it (at lr 1e-2, 69% of the latents died)."""
    dead_preact_coef: float = 3e-4
    """Weight of a pre-activation loss on the dead latents (not fired in the dead window): mean over tokens
    of Σ ReLU(θ_i − pre_i), through b_enc and θ only. A dead JumpReLU latent sits below θ − ε/2 on every
    token, where neither the reconstruction nor the L0 term reaches it; this raises its bias and lowers θ
    until it fires again. Anthropic's pre-act loss (2025), on the dead only; 0 turns it off. Keep it near
    the reconstruction's own gradient: at 1e-2 Adam's second moments, inflated while a latent is dead,
    freeze it once revived, and 80% died (MiniLM n 8192; docs/learning_rate.md)."""

    def validate(self, d: int | None = None) -> None:
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if self.l0_coef < 0:
            raise ValueError(f"l0_coef must be >= 0, got {self.l0_coef}")
        if not 0 <= self.l0_warmup_frac <= 1:
            raise ValueError(f"l0_warmup_frac must be in [0, 1], got {self.l0_warmup_frac}")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.n_latents:
            raise ValueError(f"target_l0={self.target_l0} must be in (0, n_latents={self.n_latents}]")
        if self.bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth}")
        if self.init_threshold < 0:
            raise ValueError(f"init_threshold must be >= 0, got {self.init_threshold}")
        if self.threshold_lr_scale is not None and self.threshold_lr_scale <= 0:
            raise ValueError(f"threshold_lr_scale must be positive, got {self.threshold_lr_scale}")


# --- hierarchical_topk (sae/hierarchical_topk.py)
@dataclass(frozen=True)
class HierarchicalTopKConfig:
    """HierarchicalTopK hyper-parameters."""

    arch: ClassVar[str] = "hierarchical_topk"

    n_latents: int = 4096
    """Number of latents n."""
    k: int = 64
    """K: the largest budget; the saved SAE encodes with any k <= K (default K)."""
    chunk_size: int = 256
    """Tokens per chunk of the prefix-error loop (memory O(chunk·d) per chunk; 256 measured fastest)."""
    k_aux: int | None = None
    """Latents used by AuxK; None means d/2 (capped at the number of dead latents)."""
    aux_coef: float = 1.0 / 32.0
    """Weight of the AuxK loss."""
    decoder: Literal["free", "unit"] = "free"
    """"free" (no norm constraint, choice on pre·‖W_dec,i‖) or "unit" (unit-norm rows)."""
    init_dec_norm: float | None = None
    """Norm of the initial decoder rows; None means 1.0 for "unit" and 0.1 for "free"."""
    rescale_by_decoder_norm: bool = True
    """Choose the top k on pre · ‖W_dec,i‖ (only matters for decoder="free")."""

    multi_topk: ClassVar[bool] = False  # read by the shared TopK init/validate

    def validate(self, d: int | None = None) -> None:
        TopKConfig.validate(self, d)  # type: ignore[arg-type]
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


# --- matryoshka (sae/matryoshka.py)
@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK hyper-parameters: BatchTopK's, and the nested groups."""

    arch: ClassVar[str] = "matryoshka"
    introduced: ClassVar[dict[str, object]] = {**BatchTopKConfig.introduced, "group_layout": "doubling"}
    """Fields added after runs were saved, with the value those runs trained with (read back by
    ``sae.base.saved_config``; left out of a run's record at that value: ``sae.base.recorded_fields``)."""

    group_sizes: tuple[int, ...] | None = None
    """Sizes of the nested groups, in order, summing to n_latents (e.g. 256,256,512,1024,2048);
    None: group_layout's."""
    group_layout: Literal["equal", "doubling"] = "equal"
    """Groups when group_sizes is None: "equal" (4 groups of n/4) or "doubling" (prefixes ending at
    n/16, n/8, n/4, n/2, n; the default before, whose late groups starved: docs/learning_rate.md)."""

    def __post_init__(self) -> None:
        if isinstance(self.group_sizes, list):  # from JSON/YAML
            object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))

    def validate(self, d: int | None = None) -> None:
        super().validate(d)
        if self.group_layout not in ("equal", "doubling"):
            raise ValueError(f"group_layout must be 'equal' or 'doubling', got {self.group_layout!r}")
        if self.group_sizes is not None:
            if not self.group_sizes or any(g < 1 for g in self.group_sizes):
                raise ValueError(f"group_sizes must be positive integers, got {self.group_sizes}")
            if sum(self.group_sizes) != self.n_latents:
                raise ValueError(
                    f"group_sizes {self.group_sizes} sum to {sum(self.group_sizes)}, not n_latents={self.n_latents}; "
                    "fix --group-sizes or --n-latents"
                )

    def group_ends(self) -> tuple[int, ...]:
        """Exclusive end of each prefix."""
        if self.group_sizes is not None:
            return tuple(itertools.accumulate(self.group_sizes))
        if self.group_layout == "equal":
            n, m = self.n_latents, EQUAL_GROUPS
            return tuple(sorted({n * (g + 1) // m for g in range(m)} - {0}))
        ends = sorted({self.n_latents >> s for s in (4, 3, 2, 1, 0)} - {0})
        return tuple(ends)


EQUAL_GROUPS = 4
"""Groups of Matryoshka's "equal" layout (the one count measured: docs/learning_rate.md)."""


# --- feature_choice (sae/feature_choice.py)
@dataclass(frozen=True)
class FeatureChoiceConfig:
    """Feature Choice SAE hyper-parameters."""

    arch: ClassVar[str] = "feature_choice"

    n_latents: int = 4096
    """Number of latents n."""
    k: int = 32
    """Mean active latents per token: the batch budget is k·B (latent, token) pairs."""
    capacity: Literal["uniform", "zipf"] = "uniform"
    """Per-latent token capacities: "uniform" (k·B/n each) or "zipf" (by density rank)."""
    zipf_alpha: float = 1.0
    """Exponent α of the Zipf capacities m_r ∝ (r+1)^−α."""
    aux_zipf_coef: float = 1.0 / 32.0
    """Weight of aux_zipf_loss (AuxK over latents used less than the Zipf fit predicts); 0 turns it off."""
    aux_zipf_c: float = 0.5
    """A latent is under-used when its EMA density is below this multiple of the Zipf fit for its rank."""
    k_aux: int | None = None
    """Latents used by the auxiliary loss per token; None means d/2 (capped at n)."""
    density_decay: float = 0.99
    """EMA decay of the per-latent firing densities (per step)."""
    threshold_decay: float = 0.99
    """EMA decay of the per-latent inference thresholds (per step)."""

    def validate(self, d: int | None = None) -> None:
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k={self.k} must be between 1 and n_latents={self.n_latents}")
        if self.capacity not in ("uniform", "zipf"):
            raise ValueError(f"capacity must be 'uniform' or 'zipf', got {self.capacity!r}")
        if self.zipf_alpha < 0:
            raise ValueError(f"zipf_alpha must be >= 0, got {self.zipf_alpha}")
        for name in ("density_decay", "threshold_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.aux_zipf_coef < 0 or self.aux_zipf_c < 0:
            raise ValueError("aux_zipf_coef and aux_zipf_c must be >= 0")
        if self.k_aux is not None and not 1 <= self.k_aux <= self.n_latents:
            raise ValueError(f"k_aux={self.k_aux} must be between 1 and n_latents={self.n_latents}")


# --- masked (sae/masked.py)
@dataclass(frozen=True)
class MaskedConfig:
    """Masked-objective dictionary learning hyper-parameters."""

    arch: ClassVar[str] = "masked"

    n_latents: int = 4096
    """Number of atoms p'."""
    k: int = 32
    """Non-zero coefficients per token."""
    encoder: Literal["omp", "topk"] = "topk"
    """"omp" (the paper: OMP code on the visible coordinates, constant for the gradient) or "topk"
    (a learned TopK encoder on the visible coordinates)."""
    objective: Literal["masked", "plain"] = "masked"
    """"masked" (fit on visible coordinates, loss on the hidden ones) or "plain" (all coordinates)."""
    visible_frac: float = 0.9
    """Share of coordinates visible to the code fit."""
    train_b_dec: bool = True
    """Let Adam move b_dec; False keeps it at its init."""
    init_b_dec: Literal["geometric_median", "zero"] = "geometric_median"
    """b_dec at init: "geometric_median" of the sample or "zero"."""

    def validate(self, d: int | None = None) -> None:
        if self.n_latents < 1:
            raise ValueError(f"n_latents must be positive, got {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k={self.k} must be between 1 and n_latents={self.n_latents}")
        if self.encoder not in ("omp", "topk"):
            raise ValueError(f"encoder must be 'omp' or 'topk', got {self.encoder!r}")
        if self.objective not in ("masked", "plain"):
            raise ValueError(f"objective must be 'masked' or 'plain', got {self.objective!r}")
        if not 0 < self.visible_frac < 1:
            raise ValueError(f"visible_frac must be in (0, 1), got {self.visible_frac}")
        if self.init_b_dec not in ("geometric_median", "zero"):
            raise ValueError(f"init_b_dec must be 'geometric_median' or 'zero', got {self.init_b_dec!r}")
        if d is not None and self.objective == "masked":
            n_vis = n_visible(self, d)
            if not 1 <= n_vis < d:
                raise ValueError(
                    f"visible_frac={self.visible_frac} leaves {n_vis} of d={d} coordinates visible; "
                    "at least one must be visible and one hidden"
                )


# --- itda (sae/itda.py)
@dataclass(frozen=True)
class ITDAConfig:
    """ITDA hyper-parameters."""

    arch: ClassVar[str] = "itda"

    k: int = 32
    """Matching-pursuit steps per token (L0 is at most k)."""
    tau: float = 0.1
    """Add a token to the dictionary when its relative MP loss ‖u − û‖²/‖u‖² exceeds this."""
    max_atoms: int = 65536
    """The dictionary stops growing at this size."""
    center: bool = False
    """Subtract the sample mean before normalising (the paper uses raw activations: False)."""

    def validate(self, d: int | None = None) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0 < self.tau < 1:
            raise ValueError(f"tau must be in (0, 1), got {self.tau} (a relative squared error)")
        if self.max_atoms < 1:
            raise ValueError(f"max_atoms must be positive, got {self.max_atoms}")


def n_visible(cfg: MaskedConfig, d: int) -> int:
    """Coordinates visible to the masked code fit."""
    return int(round(cfg.visible_frac * d))


ARCH_CONFIGS: dict[str, type] = {
    cls.arch: cls
    for cls in (
        TopKConfig,
        ReluL1Config,
        GBAConfig,
        BatchTopKConfig,
        JumpReLUConfig,
        HierarchicalTopKConfig,
        MatryoshkaConfig,
        FeatureChoiceConfig,
        MaskedConfig,
        ITDAConfig,
    )
}
"""The registry: architecture name (= its module, ``sae/<arch>.py``) → its config class, in the order
the CLI and docs list them. ``sae.archs.ARCH_MODULES`` is these names."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → the docstring under it, whitespace collapsed.

    Python (before 3.14) keeps no field docstrings at run time, so they are read from the source of
    the class and of the config classes it extends; the fields, types and defaults themselves come
    from the dataclass.
    """
    out: dict[str, str] = {}
    for owner in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(owner):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(owner)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for item, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                out[item.target.id] = " ".join(nxt.value.value.split())
    return {f.name: out[f.name] for f in dataclasses.fields(cls) if f.name in out}
