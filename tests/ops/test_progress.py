"""FedAvg's progress bar: a widget only where one can be drawn, never a TqdmWarning."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
from tqdm.std import tqdm as plain_tqdm

from fedws.fl import progress


class ZMQInteractiveShell:  # the class name Jupyter kernels' shells have
    pass


@pytest.fixture
def in_jupyter(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("IPython")
    fake.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)


def test_outside_jupyter_the_bar_is_plain_and_follows_the_terminal() -> None:
    assert not progress.in_notebook()
    bar = progress.progress_bar(range(3), show=None)
    assert type(bar) is plain_tqdm
    bar.close()
    assert progress.progress_bar(range(3), show=False).disable


def test_in_jupyter_without_ipywidgets_a_plain_bar_and_no_warning(
    in_jupyter: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "_has_widgets", lambda: False)
    assert progress.in_notebook()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a TqdmWarning would raise here
        bar = progress.progress_bar(range(3), show=None, desc="fedavg")
        assert type(bar) is plain_tqdm and not bar.disable
        assert list(bar) == [0, 1, 2]
        bar.close()


def test_in_jupyter_with_ipywidgets_the_notebook_bar(in_jupyter: None) -> None:
    pytest.importorskip("ipywidgets")
    from tqdm.notebook import tqdm as notebook_tqdm

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = progress.progress_bar(range(2), show=True)
        assert isinstance(bar, notebook_tqdm)
        bar.close()
