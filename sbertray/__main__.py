import sys

from sbertray.cli import main

sys.exit(main())
