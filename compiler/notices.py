"""Warnings specc gives without stopping (every layer may raise them; the CLI prints each as one line)."""


class SpeccWarning(UserWarning):
    """Something the user should know that does not stop the command."""


__all__ = ["SpeccWarning"]
