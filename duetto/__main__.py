import sys

from duetto.cli import main

sys.exit(main())
