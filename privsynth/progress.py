"""The one progress callback type: every long step reports `progress(what, done, total)`.

`what` names the step (the CLI groups lines by the part before " ("), `done` of `total` units of
work are finished. Library code only calls it; drawing bars or lines is the CLI's business.
"""
from __future__ import annotations

from typing import Callable

Progress = Callable[[str, int, int], None]
