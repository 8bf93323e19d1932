"""Plans: trace a function once, send it, run it remotely with one message per call.

``func2plan``/``Plan`` build plans (:mod:`.plan`, tracing in :mod:`.trace`), ``PointerPlan``
calls them on workers (:mod:`.pointer_plan`) knowing only their :class:`PlanSignature`
(:mod:`.signature`). The interpreter that runs plan code lives in
:mod:`fedws.node.interpreter`, the wire schema in :mod:`fedws.protocol.plan`.
"""

from ..protocol.plan import Op, PlanCode
from .plan import Plan, func2plan
from .pointer_plan import MultiPointerPlan, PointerPlan
from .protocol import PointerProtocol, Protocol
from .signature import PlanSignature
from .state import State

__all__ = ["Plan", "func2plan", "PointerPlan", "MultiPointerPlan", "PlanSignature", "State", "PlanCode", "Op",
           "Protocol", "PointerProtocol"]
