"""certpilot: certificate lifecycle management built on Prefect.

This package is the domain core: inventory, X.509 parsing, keys at rest, audit chain, policy and
settings. It imports neither Prefect nor anything that touches the network, nor any layer above it
(connectors, blocks, tasks, flows, the CLI in ``cli``): the import-linter contracts in pyproject.toml
hold that.
"""

__version__ = "0.1.0"
