"""Prefect tasks: thin retryable units over certpilot's core and connectors."""
