import sys

from dia.grid import main

sys.exit(main())
