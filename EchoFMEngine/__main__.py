import sys

from EchoFMEngine.cli import main

sys.exit(main())
