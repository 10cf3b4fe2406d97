"""`python -m ddfast`: the ddfast command line."""
import sys

from .paper.cli import main

sys.exit(main())
