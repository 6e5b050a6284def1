"""Workflows over the stages: `duetto report` (the study table with intervals) and `duetto demo`."""
