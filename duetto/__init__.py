"""Duetto: sweep GaLore and QLoRA fine-tunes on Ray, then serve them as a generate-then-rerank ensemble.

The stage folders at the repo root (data/, trainers/, tune/, serve/, cluster/) install as
``duetto.data``, ``duetto.trainers``, ... Importing ``duetto`` loads nothing heavy.
"""

__version__ = "0.1.0"
