"""One warning per process for each fallback (a library is quiet): :func:`warn_once`."""

from __future__ import annotations

import warnings

#: the keys warned about so far in this process (tests clear it)
warned: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message)`` the first time ``key`` is given in this process;
    ``stacklevel`` counts from the caller of this function, as ``warnings.warn``'s does."""
    if key not in warned:
        warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
