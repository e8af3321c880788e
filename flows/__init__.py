"""Prefect flows: the DAGs operators schedule and trigger. Each flow calls thin tasks in ``tasks``."""
