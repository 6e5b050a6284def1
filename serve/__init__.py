"""Serve stage: the generate-then-rerank ensemble as a Ray Serve app."""
