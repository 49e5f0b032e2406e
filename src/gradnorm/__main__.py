"""``python -m gradnorm ...``: the same command line as ``gradnorm ...``."""

import sys

from gradnorm.cli import main

if __name__ == "__main__":
    sys.exit(main())
