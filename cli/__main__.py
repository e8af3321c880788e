"""``python -m cli``: the certpilot command."""

from cli.main import main

main()
