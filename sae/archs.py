"""Names of the architecture modules (one file per architecture under ``sae/``).

Kept free of JAX imports, like ``sae.configs`` where each architecture's config dataclass lives:
`saewb train --help` is built from those dataclasses without loading JAX. To add an architecture,
write ``sae/<arch>.py`` and add its config class to ``sae.configs.ARCH_CONFIGS``.
"""

from __future__ import annotations

from sae.configs import ARCH_CONFIGS

ARCH_MODULES: tuple[str, ...] = tuple(ARCH_CONFIGS)
"""Each architecture's name, which is also its module's name (``sae/<arch>.py``), in registry order."""

OWN_FIT: frozenset[str] = frozenset({"itda"})
"""Architectures not trained by gradient steps: their module's ``fit`` (the signature and result of
``sae.trainer.train``) trains them, on batches that carry ``tok_idx``. `saewb train` runs it; a sweep
(lockstep gradient steps) refuses them when it is planned (``sae.orchestrate.check_lockstep``)."""
