import sys

from sau.cli import main

sys.exit(main())
