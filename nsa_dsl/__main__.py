import sys

from nsa_dsl.tools.cli import main

sys.exit(main())
