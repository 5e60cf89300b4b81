"""Measuring on the model what compression costs, for the allocators in `layerwise.plan`: the
sensitivity table (measured, or estimated more cheaply: `estimators`), the KL of whole plans
(`fitness`), and the plan command that joins them to an allocator (`run`).
"""
from __future__ import annotations

from layerwise.util.lazy import lazy_attributes

_LAZY = {
    "measure_sensitivity": "layerwise.measure.sensitivity",
    "KLFitness": "layerwise.measure.fitness",
    "ESTIMATORS": "layerwise.measure.estimators",
    "run_plan": "layerwise.measure.run",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes("layerwise.measure", _LAZY, globals())
