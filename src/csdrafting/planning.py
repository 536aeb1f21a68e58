"""What the engine asks of a planner, and where the default one is attached.

``k_matrix="auto"`` over loaded levels may be *planned*: measured on this machine and chosen by
a cost model (``autoplan.py``, which runs the tuner). The engine does not know how. It takes
any ``Planner``: an explicit ``plan`` to run, a ``judge`` for the adaptive schedule's per-level
switch, and ``observe`` after each generation, which may return a new plan. A ``Cascade`` built
without naming a planner asks the default factory, which the package attaches at import
(``csdrafting/__init__.py``: the auto-planner, loaded only when a configuration is ``"auto"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .config import CascadeConfig
from .schedule import LevelJudge


class Plan(Protocol):
    """An explicit configuration to run and, for every K entry, the acceptance it was planned for
    (the adaptive schedule's prior for that entry)."""

    config: CascadeConfig
    priors: tuple[tuple[float, ...], ...]

    def as_dict(self) -> dict: ...


class Planner(Protocol):
    plan: Plan

    @property
    def observing(self) -> bool:
        """Whether finished generations are still worth telling ``observe``."""

    def observe(self, prompt_ids: list[int], output_ids: list[int]) -> Plan | None:
        """Learn from a finished generation; a new plan to run, else None."""

    def judge(self, config: CascadeConfig) -> LevelJudge:
        """The per-level switch's judge for a plan's configuration."""


PlannerFactory = Callable[[object, CascadeConfig], "Planner | None"]  # (levels, config) -> planner or None

_default_factory: PlannerFactory | None = None


def set_default_planner(factory: PlannerFactory | None) -> None:
    """The factory a ``Cascade`` asks for a planner when none is named (None: never plan)."""
    global _default_factory
    _default_factory = factory


def default_planner(levels, config: CascadeConfig) -> Planner | None:
    """A planner for ``config`` over ``levels`` from the default factory; None where the
    configuration is explicit or no factory is attached."""
    if not config.is_auto or _default_factory is None:
        return None
    return _default_factory(levels, config)
