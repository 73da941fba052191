"""Errors of the AOT compiler.

::

    cloud.errors.UserError
    └── UnsupportedByCompiler   the .tflite cannot be compiled as given (an operator or option
                                the kernels do not implement, a model that is not fully int8,
                                bytes that are not a .tflite): change the model, do not retry

Every message is one line: what, where (operator index, type and output tensor name), why.
"""

from __future__ import annotations

from edgeloop.cloud.errors import UserError

__all__ = ["UnsupportedByCompiler"]


class UnsupportedByCompiler(UserError):
    """The model uses something the compiler cannot turn into bit-exact C."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
