"""``python -m nemo_layerfx_cli``: the same as ``layerfx``."""

import sys

from nemo_layerfx_cli import main

sys.exit(main())
