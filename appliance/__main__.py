"""`python -m appliance`: the same as the `appliance` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
