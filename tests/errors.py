"""Checking user errors: a QwenMLXError whose message fits on one line."""

import pytest

from qwenmlx.errors import QwenMLXError


def one_line_error(call, *args) -> str:
    """The message of the QwenMLXError that call(*args) raises, checked to be a single line."""
    with pytest.raises(QwenMLXError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message
