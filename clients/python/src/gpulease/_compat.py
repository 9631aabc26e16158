"""Typing features newer than the oldest Python the client supports (3.9)."""

import sys

if sys.version_info >= (3, 11):
    from typing import TypedDict as TypedDict
    from typing import Unpack as Unpack
else:  # Unpack of a TypedDict in **kwargs (PEP 692) and its TypedDict
    from typing_extensions import TypedDict as TypedDict
    from typing_extensions import Unpack as Unpack
