"""Checks of config values that take one of a fixed set, run by `main` before any corpus is built or model trained.

Each task module has `check_config(config)` calling these; a bad value raises `ConfigError` naming the key, the
value and the choices, e.g. `--config.adaptation='finetun' is not one of: none, finetune, ...`.
"""


class ConfigError(ValueError):
  """A config value outside its choices."""


def value_of(config, key):
  """`config.a.b` for key 'a.b'."""
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def choice(config, key, choices, why=""):
  """Raises ConfigError unless `config.<key>` is one of `choices`."""
  value = value_of(config, key)
  if value not in choices:
    raise ConfigError(f"--config.{key}={value!r} is not one of: {', '.join(map(str, choices))}"
                      + (f" ({why})" if why else ""))


def subset(config, key, choices):
  """Raises ConfigError unless every item of the sequence `config.<key>` is one of `choices`."""
  unknown = [v for v in value_of(config, key) if v not in choices]
  if unknown:
    raise ConfigError(f"--config.{key}: {', '.join(map(repr, unknown))} not among: {', '.join(choices)}")
