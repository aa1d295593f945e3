"""The `sdft` commands, one module per command group; `selfdistill.cli` registers them on its app.

They sit above everything else: each reads its options from a settings dataclass and calls the code
that runs it, so nothing below imports a command.
"""
