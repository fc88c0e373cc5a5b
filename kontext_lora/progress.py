"""Progress bars: tqdm, hidden on the processes that should not draw one, and honouring tqdm's environment."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, *, show: bool = True, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, hidden where `show` is false.

    `disable` is passed only to hide a bar: tqdm reads TQDM_DISABLE (and every TQDM_* setting) for the arguments a
    call leaves out, so an explicit `disable=False` would draw bars that TQDM_DISABLE=1 asked to silence.
    """
    if not show:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
