"""Tune stage: Ray Tune sweeps over trials of both methods."""
