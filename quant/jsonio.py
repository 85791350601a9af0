"""JSON from files and the network, with its nesting bounded: json.loads raises RecursionError (not a ValueError)
on input nested thousands of levels deep, which every caller's `except json.JSONDecodeError` missed. Here it is a
JSONDecodeError like any other malformed input."""

from __future__ import annotations

import json


def loads(text: str | bytes | bytearray, **kw):
    try:
        return json.loads(text, **kw)
    except RecursionError:
        doc = text if isinstance(text, str) else ""
        raise json.JSONDecodeError("nested too deeply", doc, 0) from None
