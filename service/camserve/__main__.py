"""`python -m camserve` runs the command line (`camserve --help`)."""

import sys

from camserve.cli import main

sys.exit(main())
