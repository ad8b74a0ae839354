import sys

from dia.bench import main

sys.exit(main())
