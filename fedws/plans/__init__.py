"""Plans: trace a function once, send it, run it remotely with one message per call.

``func2plan``/``Plan`` build plans (:mod:`.plan`, tracing in :mod:`.trace`), ``PointerPlan``
calls them on workers (:mod:`.pointer_plan`), and :mod:`.runner` is the interpreter the
node uses (``store_plan``/``run_plan``).
"""

from .code import Op, PlanCode
from .plan import Plan, func2plan
from .pointer_plan import MultiPointerPlan, PointerPlan
from .state import State

__all__ = ["Plan", "func2plan", "PointerPlan", "MultiPointerPlan", "State", "PlanCode", "Op"]
