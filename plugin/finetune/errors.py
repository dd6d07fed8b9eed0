"""Errors of fine-tuning whose message is meant for the user: what is wrong and how to fix it."""

from __future__ import annotations


class FinetuneError(ValueError):
    """A fine-tune that cannot start or finish: bad options, no device to train on, an output folder in the way."""


class DataError(FinetuneError):
    """The training data file is unusable; the message names the file, each bad line, and the fix."""
