"""The Plan type: which quantizer applies to which module (numbers in, plan out; no torch.nn)."""
from __future__ import annotations

from layerwise.plan.allocate import ALLOCATORS, Allocation, AllocationProblem, allocate, register_allocator
from layerwise.plan.plan import Plan

__all__ = ["ALLOCATORS", "Allocation", "AllocationProblem", "Plan", "allocate", "register_allocator"]
