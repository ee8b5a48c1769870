import sys

from xent.cli import main

sys.exit(main())
