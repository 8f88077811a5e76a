"""The one exception type of the training subsystem."""


class TrainError(Exception):
    """A problem the user can fix before (or instead of) training: bad paths, a student that does not
    match the store, an impossible layer map, a checkpoint that cannot be resumed."""
