import sys

from securefed.cli import main

sys.exit(main())
