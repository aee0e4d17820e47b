"""``python -m tokenthrift`` (and ``torchrun -m tokenthrift``) runs the command line."""
from .apps.cli import main

main()
