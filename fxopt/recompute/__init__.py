"""Recompute planning for `memory_budget`: cost.py (memory/time model on the joint graph), ops.py (one op call's
sizes, roofline time, registered cost and workspace, schema arguments), plan.py (solver),
partition.py (the partitioner hook), model_plan.py (`python -m fxopt plan`: a plan for a transformers config)."""
from fxopt.recompute.cost import Joint
from fxopt.recompute.plan import BudgetError, Plan, make_plan, smallest_peak

__all__ = ["Joint", "BudgetError", "Plan", "make_plan", "smallest_peak"]
