"""The progress bar of a training run: a notebook widget in Jupyter when ipywidgets is
installed, a plain text bar everywhere else, and never a warning.

``tqdm.auto`` picks the notebook bar in any Jupyter kernel and, without ipywidgets, prints
a red ``TqdmWarning: IProgress not found`` on every bar; here the widget is used only when
it can be drawn (``pip install fedws[notebook]`` brings ipywidgets).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar", "in_notebook"]


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (not a terminal IPython)."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _has_widgets() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


def progress_bar(iterable: Iterable[Any], *, show: bool | None, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable``. ``show=None``: on a terminal or in a notebook, else off."""
    notebook = in_notebook()
    disable = (None if not notebook else False) if show is None else not show
    if notebook and _has_widgets():
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm(iterable, disable=disable, **kwargs)
    from tqdm.std import tqdm

    return tqdm(iterable, disable=disable, **kwargs)
