"""Prefect Blocks: connector configuration and credentials, each with one factory for its connector.

The inventory needs none: it is configured by CERTPILOT_DATABASE_URL and the master key. Issuer
blocks (ACME, private CA) and deployment-target blocks (SSH, AWS, Azure) arrive with the issuers
and deployers that use them.
"""
