from __future__ import annotations

import sys

from layerwise.cli import main

sys.exit(main())
