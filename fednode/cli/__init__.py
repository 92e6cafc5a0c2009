"""CLI layer: the ``fednode`` command (``fednode.cli.main:main``). It sits on top of every other
layer and is the only place that turns errors into exit codes and one-line messages."""
