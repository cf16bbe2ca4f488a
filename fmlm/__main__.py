import sys

from fmlm.engine.cli import main

sys.exit(main())
