"""`python -m g2sd_cache.cli` runs the command line, as the g2sd-cache script does."""
import sys

from g2sd_cache.cli.main import main

sys.exit(main())
