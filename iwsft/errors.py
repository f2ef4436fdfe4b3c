"""The one exception for bad user input: command-line tools print it as one line and exit 2."""


class UserError(Exception):
  """Input the user can fix (bad flag value, missing or malformed dataset). Never a bug."""
