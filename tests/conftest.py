"""Test wiring. The gft command (cli.py) imports `backends`, which registers the torch/mlx
provider with gft.backend; tests that call gft.run directly get the same wiring here."""
import backends  # noqa: F401
