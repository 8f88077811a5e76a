"""The one exception type of the demo."""


class DemoError(Exception):
    """The demo cannot start or a stage failed; the message names the stage or path and what to do."""
