"""The base layer: settings and logging, which every other package imports and which imports none of them."""

__version__ = "0.1.0"
