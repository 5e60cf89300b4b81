"""Figures and reports a person would rather look at than read."""
