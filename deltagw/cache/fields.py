"""Reading header fields held as ``(name, value)`` byte pairs.

The cache works on the pairs the upstream client and the forwarding rules
already produce, not on twisted.web's ``Headers``, so its decisions are plain
functions of plain data.
"""

from __future__ import annotations

from collections.abc import Sequence

HeaderPairs = Sequence[tuple[bytes, bytes]]
"""Header fields in the order they came, one pair per field line; names in any case."""

OPTIONAL_WHITESPACE = b" \t"
"""OWS (RFC 9110 §5.6.3): what may surround a field value and a list element."""


def field_lines(headers: HeaderPairs, name: bytes) -> list[bytes]:
    """The values of every line of one field, in order.

    Args:
        headers: The header fields.
        name: The field name, lower-case (field names are case-insensitive,
            RFC 9110 §5.1).

    Returns:
        Each line's value as it came, possibly empty.
    """
    return [value for field, value in headers if field.lower() == name]


def combined_value(lines: Sequence[bytes]) -> bytes | None:
    """One value for a field sent on several lines (RFC 9110 §5.3).

    A recipient may combine field lines with a comma in order; the
    whitespace around each line is not part of its value (RFC 9110 §5.5).

    Args:
        lines: The values of the field's lines, in order.

    Returns:
        The stripped lines joined with ``", "``, or None when the field is
        absent (absent is not the same as empty).
    """
    if not lines:
        return None
    return b", ".join(line.strip(OPTIONAL_WHITESPACE) for line in lines)
