"""Names of the architecture modules (one file per architecture under ``sae/``).

Kept free of JAX imports: the CLI reads the modules' config dataclasses with ``ast`` to build
`saewb train --help` without loading JAX. Add a new architecture's module name here.
"""

from __future__ import annotations

ARCH_MODULES: tuple[str, ...] = (
    "topk",
    "relu_l1",
    "gba",
    "batchtopk",
    "jumprelu",
    "hierarchical_topk",
    "matryoshka",
    "feature_choice",
    "masked",
    "itda",
)

OWN_FIT: frozenset[str] = frozenset({"itda"})
"""Architectures not trained by gradient steps: their module's ``fit`` (the signature and result of
``sae.trainer.train``) trains them, on batches that carry ``tok_idx``. `saewb train` runs it; a sweep
(lockstep gradient steps) refuses them when it is planned (``sae.orchestrate.check_lockstep``)."""
