"""What the optional extras install, and the error a tool gives when its extra is missing.

`pip install dcal` installs what `import dcal`, `dcal train` and `dcal doctor` on a run folder need. The rest
comes with an extra (pyproject.toml): ``dcal[diagnostics]`` (the run and rollout explorers' ipywidgets,
TensorBoard's event reader), ``dcal[notebooks]`` (JupyterLab, jupytext, nbclient) and ``dcal[dev]`` (the
tests; pulls in both). A tool that needs one imports it through `require`, which names the extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require", "EXTRAS"]

# The extra that installs each optional top-level package the library imports.
EXTRAS = {"tensorboard": "diagnostics", "ipywidgets": "diagnostics"}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message says what needed it and which extra installs it."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import `module` (a top-level package of `EXTRAS`, or one of its submodules), or raise
    `MissingExtraError` naming `needed_for` and the ``pip install 'dcal[extra]'`` that fixes it."""
    top = module.partition(".")[0]
    if top not in EXTRAS:
        raise ValueError(f"require: {top!r} is not an optional package of dcal (known: {sorted(EXTRAS)})")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != top:
            raise  # the package is there but one of its own imports failed: that is its error, unchanged
        raise MissingExtraError(f"{needed_for} needs the {top} package, which is not installed; install it with "
                                f"pip install 'dcal[{EXTRAS[top]}]'") from e
