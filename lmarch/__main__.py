import sys

from lmarch.cli.main import main

sys.exit(main())
