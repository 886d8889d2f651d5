import sys

from tianying.cli import main

sys.exit(main())
