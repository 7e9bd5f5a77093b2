"""DiffMIC (Yang et al., MICCAI 2023) as a library and the ``diffmic`` command.

``import diffmic`` loads nothing but the version (layer 0, docs/design.md). ``diffmic.fit`` and
``diffmic.test`` (train and test a run folder from Python, see :mod:`diffmic.api`) are imported from
``diffmic.api`` on first use, with Lightning and torch behind them.
"""

__version__ = "0.1.0"

#: names the package root re-exports lazily from diffmic.api (the one exception to layer 0, see
#: tests/test_layers.py)
_LAZY = ("fit", "test", "RunResult")
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        from diffmic import api

        value = getattr(api, name)
        globals()[name] = value  # later look-ups find it directly
        return value
    raise AttributeError(f"module 'diffmic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
