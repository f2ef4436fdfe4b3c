"""The one exception for bad user input: command-line tools print it as one line and exit 2."""


class UserError(Exception):
  """Input the user can fix (bad flag value, missing or malformed dataset). Never a bug."""


class MissingExtra(ImportError):
  """A pipeline imported without the packages of its extra (`pip install 'iwsft[<extra>]'`)."""


def require_extra(extra: str, *modules: str) -> None:
  """Raises MissingExtra naming the extra to install when any of `modules` cannot be found."""
  import importlib.util

  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    raise MissingExtra(
      f"this part of iwsft needs {', '.join(missing)}: pip install 'iwsft[{extra}]' "
      "(the core, `import iwsft`, needs no extra)"
    )
