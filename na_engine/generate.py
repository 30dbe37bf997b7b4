"""`python -m na_engine.generate` = `python -m na_engine generate`, a module path for `accelerate launch -m`."""

import sys

from .standalone.generate import main

if __name__ == "__main__":
    sys.exit(main())
