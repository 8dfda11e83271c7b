import sys

from devices.worker import main

sys.exit(main())
