"""The one exception type for unusable data: its message names the dataset, directory or key."""


class DataError(ValueError):
    """A dataset that cannot be read or used as configured."""
