"""``python -m tokenthrift`` (and ``torchrun -m tokenthrift``) runs the command line."""
from .cli import main

main()
