"""Makes the module importable from a plain checkout (python3 -m pytest from the top)."""

import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))
