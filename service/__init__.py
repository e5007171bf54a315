"""branchbuild: every push to every branch becomes a CodeBuild build."""

__version__ = "0.1.0"

__all__ = ["__version__"]
