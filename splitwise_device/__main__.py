import sys

from splitwise_device.cli import main

sys.exit(main())
