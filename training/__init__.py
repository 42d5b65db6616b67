"""Offline pipeline: query tables, labelling, activation capture, probes, fitting, evaluation."""
