"""certpilot: certificate lifecycle management built on Prefect.

This package is the domain core: inventory, X.509 parsing, keys at rest, audit chain, policy and
settings. It imports neither Prefect nor anything that touches the network; ``certpilot.cli`` is the
one module that may import ``flows``, inside its commands.
"""

__version__ = "0.1.0"
