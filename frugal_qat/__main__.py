import sys

from frugal_qat.cli.main import main

sys.exit(main())
