"""Trainers stage: one GaLore or QLoRA trial as a Ray Train worker function."""
