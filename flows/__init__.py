"""Prefect flows: they orchestrate the stages in tasks/ and pass paths and small configs, never tensors."""
