"""`python -m calibrl <command>`."""
import sys

from calibrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
