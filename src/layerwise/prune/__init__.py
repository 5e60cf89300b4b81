"""Removing depth the model does not use: drops, schedules, and the choice of what to drop."""
from layerwise.prune.choose import CRITERIA, DropChoice, choose_drops
from layerwise.prune.depth import DROP_KINDS, delete_blocks_, schedule, silence_

__all__ = ["CRITERIA", "DROP_KINDS", "DropChoice", "choose_drops", "delete_blocks_", "schedule", "silence_"]
