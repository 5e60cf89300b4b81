"""Numbers in, plan out, without torch: the Plan type (which quantizer applies to which module),
options and units, the sensitivity table, and the allocators that choose from it under a budget.
Filling the table on a model is `layerwise.measure`'s job."""
from __future__ import annotations

from layerwise.plan.allocate import ALLOCATORS, allocate, register_allocator
from layerwise.plan.plan import Plan
from layerwise.plan.problem import Allocation, AllocationProblem
from layerwise.plan.search import evolutionary, hybrid  # the searching allocators register on import
from layerwise.plan.table import SensitivityTable

__all__ = ["ALLOCATORS", "Allocation", "AllocationProblem", "Plan", "SensitivityTable", "allocate", "evolutionary", "hybrid",
           "register_allocator"]
