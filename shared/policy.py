"""Routing policies, defined once for training, evaluation and serving, in a registry.

A :class:`Policy` is a routing rule with its parameter: what an artifact's operating point,
an evaluation and a served request route by. Each subclass is one policy, registered under
its ``name`` when the class is defined:

- :meth:`Policy.route`: the chosen target per query;
- :meth:`Policy.candidates`: one query's targets in fallback order, the chosen one first;
- :meth:`Policy.sweep`: every routing of the parameter, the frontier evaluation draws from;
- ``param``: the parameter, validated by pydantic (the subclass's field); ``requested``: the
  stricter bounds a request body or the serving config may set it to.

Built in: :class:`Tolerance` (the cheapest target within ``tol`` of the best P(correct)) and
:class:`Value` (the highest ``value * P(correct) - cost``). The request schema, the artifact,
the evaluation and the demo read the registry (:func:`policy_names`, :meth:`Policy.of`), so a
new policy is one new subclass. The routing arithmetic is :mod:`shared.routing`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.errors import BadInput
from shared.routing import (
    Sweep, ValueSweep, route_by_value, route_with_tolerance, routing_outcome, tolerance_sweep, value_sweep,
    within_tolerance,
)

REGISTRY: dict[str, type["Policy"]] = {}  # name -> policy class, in definition order


def policy_names() -> tuple[str, ...]:
    """The registered policies' names, in definition order (``tolerance`` first)."""
    return tuple(REGISTRY)


class Policy(BaseModel):
    """A routing policy and its parameter. Subclass it with a ``name``, a ``param`` field (its
    pydantic bounds) and :meth:`route`; the class registers itself. :meth:`candidates` and
    :meth:`sweep` have generic defaults (a subclass may give exact ones)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str]
    requested: ClassVar[Any] = None  # the type a request may set param to (None: param's own bounds)
    summary: ClassVar[str] = ""  # one sentence for the evaluation report
    param: float = Field(ge=0, description="The policy's parameter.")

    def __init__(self, param: float | None = None, /, **data: Any):
        super().__init__(**({"param": param} if param is not None else {}), **data)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        if name in REGISTRY:
            raise ValueError(f"a routing policy named {name!r} is already registered ({REGISTRY[name].__name__})")
        REGISTRY[name] = cls

    # ----------------------------------------------------------------- registry
    @staticmethod
    def named(name: str) -> type["Policy"]:
        """The policy class registered as ``name`` (ValueError for an unknown one)."""
        if name not in REGISTRY:
            raise BadInput(f"unknown routing policy {name!r}; use one of {policy_names()}")
        return REGISTRY[name]

    @staticmethod
    def of(name: str, param: float) -> "Policy":
        """The checked policy ``name`` with ``param`` (ValueError: unknown name or a bad parameter)."""
        return Policy.named(name)(float(param))

    @classmethod
    def from_request(cls, param: Any) -> "Policy":
        """The policy with a parameter from a request or the serving config, checked against
        ``requested`` (default: ``param``'s own bounds); a pydantic ValidationError locates an
        error at the parameter itself (``loc`` empty)."""
        field = cls.model_fields["param"]
        return cls(param=TypeAdapter(cls.requested or Annotated[field.annotation, field]).validate_python(param))

    @staticmethod
    def pick(params: Mapping[str, Any], prefix: str = "", requested: bool = False) -> "Policy | None":
        """The one policy set among ``params`` (``{prefix + policy name: parameter or None}``), or
        None; ValueError when more than one is set. ``requested``: check the request bounds."""
        given = {key: v for key, v in params.items() if v is not None}
        if len(given) > 1:
            keys = list(given)
            raise BadInput(f"give at most one of {', '.join(keys[:-1])} and {keys[-1]} (one routing policy)")
        for key, v in given.items():
            cls = Policy.named(key.removeprefix(prefix))
            return cls.from_request(v) if requested else cls(param=v)
        return None

    def fields(self) -> dict[str, Any]:
        """``{"policy": name, <each registered name>: param if it is this policy else None}``: the
        flat form of the artifact's operating point, a route decision and the evaluation report."""
        return {"policy": self.name, **{n: self.param if n == self.name else None for n in REGISTRY}}

    # ----------------------------------------------------------------- routing
    def route(self, P: np.ndarray, costs: np.ndarray) -> np.ndarray:
        """Chosen target per query, ``(n,)`` int, of ``P`` ``(n, T)`` and costs ``(T,)`` or ``(n, T)``."""
        raise NotImplementedError(f"the {self.name} policy must define route")

    def candidates(self, p: np.ndarray, costs: np.ndarray) -> list[int]:
        """One query's targets in fallback order, the chosen one first (default: then the rest by
        P(correct), ties cheaper first). ``p`` and ``costs`` are ``(T,)``."""
        p, costs = np.asarray(p, dtype=np.float64), np.asarray(costs, dtype=np.float64)
        chosen = int(self.route(p[None, :], costs[None, :])[0])
        by_cost = np.argsort(costs, kind="stable")
        return [chosen, *(int(i) for i in by_cost[np.argsort(-p[by_cost], kind="stable")] if i != chosen)]

    @classmethod
    def grid(cls, P: np.ndarray, C_route: np.ndarray) -> np.ndarray:
        """The parameters the generic :meth:`sweep` routes with (a subclass without an exact sweep gives them)."""
        raise NotImplementedError(f"the {cls.name} policy must define grid or sweep")

    @classmethod
    def sweep(cls, P: np.ndarray, Y: np.ndarray, C: np.ndarray, C_route: np.ndarray | None = None) -> tuple:
        """``(param, accuracy, cost)``, three aligned ``(k,)`` arrays sorted by cost ascending (then
        param descending): the :func:`shared.routing.routing_outcome` of routing ``P`` with each
        parameter (``C_route``: the costs the policy decides with; ``C``: recorded). The default
        routes with every parameter of :meth:`grid`."""
        Cr = C if C_route is None else C_route
        params = np.asarray(cls.grid(P, Cr), dtype=np.float64)
        accs, costs = np.array([routing_outcome(Y, C, cls(param=float(v)).route(P, Cr)) for v in params]).T
        idx = np.lexsort((-params, costs))
        return params[idx], accs[idx], costs[idx]

    # ----------------------------------------------------------------- words
    def label(self, long: bool = False) -> str:
        """The rule in a report's table cell, or in prose (``long``)."""
        return f"{self.name} {self.param:.4g}"

    def explain(self, probabilities: Mapping[str, float], costs: Mapping[str, float], eligible: list[str]) -> str:
        """What the policy did with one prompt's P(correct) per target (the demo's line)."""
        return f"{self.name} {self.param:.3g}: {', '.join(eligible)} -> {eligible[0]}"


class Tolerance(Policy):
    """``tol`` in P(correct): the cheapest target within ``tol`` of the best
    (:func:`shared.routing.route_with_tolerance`); ``tol = 0`` the most likely, ``tol >= 1`` the cheapest."""

    name: ClassVar[str] = "tolerance"
    requested: ClassVar[Any] = Annotated[float, Field(ge=0, le=1)]
    summary: ClassVar[str] = ("The tolerance policy takes the cheapest target within a tolerance of the best "
                              "P(correct), whatever the price difference.")
    param: float = Field(ge=0, description="Tolerance in P(correct).")

    def route(self, P: np.ndarray, costs: np.ndarray) -> np.ndarray:
        return route_with_tolerance(P, costs, self.param)

    def candidates(self, p: np.ndarray, costs: np.ndarray) -> list[int]:
        """The targets within the tolerance of the best, cheapest first; equally cheap ones by
        higher ``p``, then index (the first is :meth:`route`'s choice)."""
        p, costs = np.asarray(p, dtype=np.float64), np.asarray(costs, dtype=np.float64)
        near = within_tolerance(p[None, :], self.param)[0]
        return [int(i) for i in np.lexsort((np.arange(len(p)), -p, costs)) if near[i]]

    @classmethod
    def sweep(cls, P: np.ndarray, Y: np.ndarray, C: np.ndarray, C_route: np.ndarray | None = None) -> Sweep:
        """Exact: every distinct gap as the tolerance (:func:`shared.routing.tolerance_sweep`)."""
        return tolerance_sweep(P, Y, C, C_route)

    def label(self, long: bool = False) -> str:
        return f"{'tolerance' if long else 'tol'} {self.param:.4g}"

    def explain(self, probabilities: Mapping[str, float], costs: Mapping[str, float], eligible: list[str]) -> str:
        best = max(probabilities.values())
        tied = eligible[0] in costs and sum(costs.get(t) == costs[eligible[0]] for t in eligible) > 1
        how = "most likely of the cheapest" if tied else "cheapest"
        return f"within {self.param:.2f} of the best ({best:.2f}): {', '.join(eligible)} -> {how} {eligible[0]}"


class Value(Policy):
    """``value`` in USD per correct answer: the highest expected net value ``value * P - cost``
    (:func:`shared.routing.route_by_value`); ``value = 0`` the cheapest, ``inf`` the most likely."""

    name: ClassVar[str] = "value"
    requested: ClassVar[Any] = Annotated[float, Field(ge=0, allow_inf_nan=False)]
    summary: ClassVar[str] = ("The value policy (`shared.policy.route_by_value`) takes the target with the highest "
                              "`value * P(correct) - cost`: a target 15 times dearer must be that much more likely to "
                              "be right.")
    param: float = Field(ge=0, description="USD one correct answer is worth (may be inf).")

    def route(self, P: np.ndarray, costs: np.ndarray) -> np.ndarray:
        return route_by_value(P, costs, self.param)

    def candidates(self, p: np.ndarray, costs: np.ndarray) -> list[int]:
        """Every target by expected net value (best first; ties: cheaper, then lower index);
        ``value = inf`` orders by ``p``."""
        p, costs = np.asarray(p, dtype=np.float64), np.asarray(costs, dtype=np.float64)
        by_cost = np.argsort(costs, kind="stable")
        score = p if np.isinf(self.param) else self.param * p - costs
        chosen = int(self.route(p[None, :], costs[None, :])[0])  # near-ties as route_by_value breaks them
        return [chosen, *(int(i) for i in by_cost[np.argsort(-score[by_cost], kind="stable")] if i != chosen)]

    @classmethod
    def sweep(cls, P: np.ndarray, Y: np.ndarray, C: np.ndarray, C_route: np.ndarray | None = None) -> ValueSweep:
        """Exact: every breakpoint of every query (:func:`shared.routing.value_sweep`)."""
        return value_sweep(P, Y, C, C_route)

    def label(self, long: bool = False) -> str:
        return f"value policy at {self.param:.4g} USD per correct answer" if long else f"value {self.param:.4g}"

    def explain(self, probabilities: Mapping[str, float], costs: Mapping[str, float], eligible: list[str]) -> str:
        nets = ", ".join(f"{t} {self.param * probabilities[t] - costs.get(t, 0.0):.3g}" for t in eligible)
        return f"net value at {self.param:.3g} USD per correct answer: {nets} -> highest {eligible[0]}"
