"""The outside world, no Prefect imports: TLS probes, SSH hosts, AWS, Azure Key Vault, ACME CAs,
the private CA and notifiers, each behind one typing.Protocol role. None exist yet: the inventory
reads only local files (certpilot.importer)."""
