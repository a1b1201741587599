"""Orchestration: the stage registry, the memforge CLI, and the Prefect flows."""
