"""The command-line shell on top of every layer: the ``routet2i`` command, its benchmarks, the demo and the
load tools. It may import any package of the project; none imports it."""
