"""Run the hycomp command: ``python -m composer.cli``."""
import sys

from composer.cli.main import main

sys.exit(main())
