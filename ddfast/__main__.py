"""`python -m ddfast`: the ddfast command line."""
import sys

from .cli import main

sys.exit(main())
