"""`python -m gft ...` is the same as the `gft` command (torchrun needs a module)."""
from cli import main

main()
