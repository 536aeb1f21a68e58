"""The edge: where the process environment becomes configuration, read by the entry points
(``cli.py``, ``csd bench``, ``csd tune``) and nowhere inside the engine.

One prefix, ``CSDRAFTING_``. Each variable supplies the default of one ``CascadeConfig`` field; a
flag or a configuration file that gives the field wins over it.

* ``CSDRAFTING_KERNEL`` -> ``kernel``: the lean runner's matmul kernel (``auto`` or a name,
  ``levels/kernels.py``).
* ``CSDRAFTING_AUTO_PLAN=off`` (or 0/false/no): ``"auto"`` configurations are not planned
  (``autoplan.planner_for``); ``"auto"`` is then ``CascadeConfig.resolve()``'s fixed start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .config import KERNELS
from .errors import ConfigError

ENV_KERNEL = "CSDRAFTING_KERNEL"
ENV_AUTO_PLAN = "CSDRAFTING_AUTO_PLAN"


def config_defaults(environ: Mapping[str, str] = os.environ) -> dict:
    """The ``CascadeConfig`` field defaults the environment sets (only those it sets), checked."""
    defaults = {}
    kernel = environ.get(ENV_KERNEL, "").strip()
    if kernel:
        if kernel not in KERNELS:
            raise ConfigError(f"{ENV_KERNEL} must be one of {', '.join(KERNELS)}, got {kernel!r}")
        defaults["kernel"] = kernel
    return defaults


def default_kernel(environ: Mapping[str, str] = os.environ) -> str:
    """``$CSDRAFTING_KERNEL``, else ``auto``: the kernel of levels an entry point builds itself."""
    return config_defaults(environ).get("kernel", KERNELS[0])


def planning_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``"auto"`` configurations are planned (``$CSDRAFTING_AUTO_PLAN``, on by default)."""
    return environ.get(ENV_AUTO_PLAN, "on").strip().lower() not in ("off", "0", "false", "no")
