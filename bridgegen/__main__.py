import sys

from bridgegen.cli.main import main

sys.exit(main())
