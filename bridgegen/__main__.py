import sys

from bridgegen.cli import main

sys.exit(main())
