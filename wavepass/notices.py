"""The one way wavepass tells a user that caching or compiling stopped: once per reason.

Every message names the real cause and the fix. It is a Python warning (category
`WavespeedWarning`, a `UserWarning`), shown once per distinct message in a process (and routed
to logging at WARNING level by `logging.captureWarnings(True)`, as servers do);
`wavepass.stats(model).reason` keeps saying it for as long as it holds.
"""

from __future__ import annotations

import warnings

_warned: set[str] = set()


class WavespeedWarning(UserWarning):
    """Caching or compilation is off for some calls; the message says why and what to do."""


def warn_once(message: str, stacklevel: int = 3) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, WavespeedWarning, stacklevel=stacklevel)
