"""The ``routet2i`` command's groups, one module each, registered in :mod:`cli.main`."""
