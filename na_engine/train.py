"""`python -m na_engine.train` = `python -m na_engine train`, a module path for `accelerate launch -m`."""

import sys

from .standalone.train import main

if __name__ == "__main__":
    sys.exit(main())
