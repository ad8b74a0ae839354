import sys

from dia.report import main

sys.exit(main())
