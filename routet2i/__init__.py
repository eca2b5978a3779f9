"""RouteT2I: quality-aware routing of text-to-image requests between edge and cloud models."""

__version__ = "0.1.0"
