import sys

from dia.slurm import main

sys.exit(main())
