"""Errors that stop a run on purpose. Their messages say what happened and what to do, so the launch scripts
(experiments/*.py) print them without a traceback and exit with status 1."""


class RunError(RuntimeError):
  """A run refuses to start or stops because continuing could destroy or hide a result."""
