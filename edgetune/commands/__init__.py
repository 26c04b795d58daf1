"""The ``edgetune`` sub-commands, one module each (listed in order in ``edgetune.cli``).

Every module here defines ``register(sub)``, which adds its parser(s) to the ``edgetune``
sub-parsers and sets ``handler`` (a function from the parsed arguments to an exit code).
"""
