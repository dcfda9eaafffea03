"""Decoding a client's JSON with a size and a nesting bound: the one place bodies are parsed.

`json.loads` recurses once per nesting level: 30,000 `[` in a 64 KiB frame
raised RecursionError (not ValueError), which escaped the handlers and killed
the session with a traceback; and a depth the interpreter survives could still
break a later `json.dumps` of a relayed payload.  So the depth is checked on
the text before parsing, in linear time and at C speed (about half a
millisecond for a 64 KiB body): strings are cut out with str.split on the
quotes (escaped quotes and backslashes removed first), every byte but a
bracket is deleted, and the brackets must match a pattern of balanced groups
nested `max_depth` deep whose quantifiers are possessive, so nothing is ever
backtracked into.  Bodies with fewer brackets than the bound, nearly all of
them, skip the check.

`decode_json` raises JsonBodyError (any caller's bodies); `parse_json` is how a
SEND or an HTTP request's body is read: the same checks, failing as a 400
SignalingError whose message names the fault.
"""

from __future__ import annotations

import functools
import json
import re

from .errors import bad_request

DEFAULT_MAX_DEPTH = 32

_NOT_BRACKET_BYTES = bytes(b for b in range(256) if b not in b"[]{}")


class JsonBodyError(ValueError):
    """The body is not acceptable JSON; the message is safe to show the client."""


@functools.lru_cache(maxsize=8)
def _balanced_within(depth: int) -> re.Pattern:
    """Matches a run of balanced bracket groups nested at most `depth` deep."""
    group = rb"[\[{][\]}]"
    for _ in range(depth - 1):
        group = rb"[\[{](?:" + group + rb")*+[\]}]"
    return re.compile(rb"(?:" + group + rb")*+")


def _brackets_outside_strings(text: str) -> bytes:
    if '"' in text:
        if "\\" in text:
            # Left to right, an escaped backslash goes first, so `\\"` still ends a string.
            text = text.replace("\\\\", "").replace('\\"', "")
        text = "".join(text.split('"')[::2])
    return text.encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKET_BYTES)


def within_depth(text: str, max_depth: int) -> bool:
    """True if `text`'s arrays and objects nest at most `max_depth` deep and its brackets
    balance (outside strings); False means too deep or not JSON."""
    if text.count("[") + text.count("{") <= max_depth:
        return True
    if max_depth < 1:
        return False
    return _balanced_within(max_depth).fullmatch(_brackets_outside_strings(text)) is not None


def decode_json(body: bytes | str, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH):
    """The value of a JSON body (None for an empty or blank one); JsonBodyError for a body
    that is too large, not UTF-8, not JSON, or nested deeper than `max_depth`."""
    if len(body) > max_bytes:
        raise JsonBodyError(f"body larger than {max_bytes} bytes")
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise JsonBodyError("body is not valid UTF-8") from None
    else:
        text = body
    if not text.strip():
        return None
    deep = not within_depth(text, max_depth)
    try:
        # A body that failed the check is parsed only to tell "too deep" from "not JSON";
        # the parser's own recursion bound (RecursionError) keeps that safe.
        value = json.loads(text)
    except RecursionError:
        deep = True
    except ValueError:
        raise JsonBodyError("body is not valid JSON") from None
    if deep:
        raise JsonBodyError(f"JSON nested deeper than {max_depth} levels")
    if has_unpaired_surrogate(text, value):
        raise JsonBodyError("body has an unpaired surrogate escape (\\ud800-\\udfff)")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\[uU][dD][89a-fA-F]")


def has_unpaired_surrogate(text: str, value) -> bool:
    """Does the parsed `value` hold a lone surrogate?  JSON lets `"\\ud800"` through
    json.loads as a str no UTF-8 encoder accepts, so echoing it to another client (a
    status, an OFFER) raised UnicodeEncodeError.  Only a text with such an escape is
    checked, by encoding the value once; pairs (an emoji) are joined by the parser."""
    if "\\" not in text or _SURROGATE_ESCAPE.search(text) is None:
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_json(body: bytes, max_bytes: int = 65536, max_depth: int = DEFAULT_MAX_DEPTH):
    """A SEND's or a request's JSON body (None if empty); 400 naming what is wrong with it --
    too large, not UTF-8, not JSON, nested too deep -- and never anything else."""
    try:
        return decode_json(body, max_bytes, max_depth)
    except JsonBodyError as exc:
        raise bad_request(str(exc)) from None
