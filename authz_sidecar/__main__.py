import sys

from authz_sidecar.cli import main

sys.exit(main())
