"""Local stand-ins for AWS pieces that no emulator provides (used by tests and `make run`)."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localdev.githost import GitHost, RefChange, codecommit_event

__all__ = ["GitHost", "RefChange", "codecommit_event"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m localdev.githost` does not import the module
    # twice (runpy warns when the package has already imported the module it is asked to run).
    if name in __all__:
        from localdev import githost

        return getattr(githost, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
