"""User-input errors: ``main.py`` prints a ``BadnetError``'s message and exits 1, no traceback."""


class BadnetError(Exception):
  """An error caused by user input, with a message that says what to fix."""


class ConfigError(BadnetError):
  """A config value is out of range or inconsistent with another."""


class DataError(BadnetError):
  """A data or image file is missing, unreadable or malformed."""


class ModelFileError(BadnetError):
  """A Keras model/weights file is missing, unreadable or of the wrong architecture."""


class WorkdirError(BadnetError):
  """The working directory cannot be used, or a file in it cannot be written."""


class TrainingError(BadnetError):
  """Training diverged: a non-finite loss, or held-out accuracy that collapsed."""
