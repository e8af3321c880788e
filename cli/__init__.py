"""The ``certpilot`` command line: the top layer, beside flows/.

One module per command group (inventory, keys, audit, report, ca, managed, targets, fleet), each a
typer app that ``cli.main`` mounts. Commands call the core directly; the ones that run flows import
them inside the command. Nothing imports this package.
"""
