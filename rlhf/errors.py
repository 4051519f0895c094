"""The errors `rlhf` raises on purpose. Imports nothing, so every module can use them."""


class UserInputError(ValueError):
    """Bad input the user can fix (config, data, model path): the CLI prints it as one line."""


class ConfigError(UserInputError):
    """A config file or override that does not fit the schema."""


class NonFiniteError(RuntimeError):
    """A NaN or Inf reached a loss, reward, probability or gradient; the step was refused."""
