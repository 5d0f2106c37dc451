"""`python -m caffeserve COMMAND ...`: the same as the `caffeserve` console script."""

import sys

from caffeserve import main

sys.exit(main())
