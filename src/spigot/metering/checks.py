"""What the store refuses before it writes: counts a BIGINT cannot hold, and key names that a
lookup would read as an id.

Each rule has one copy, here: the admin API and the CLI call these too (telling a refusal in
their own shape), so the three can never disagree on what is a valid name or count.
"""

from __future__ import annotations

MAX_BIGINT = 2**63 - 1  # every integer column is a signed 64-bit BIGINT


def check_count(value: object, what: str, minimum: int) -> int:
    """``value`` as an int in [minimum, MAX_BIGINT]; ValueError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    if value > MAX_BIGINT:
        # Past what the column holds: a clear refusal, not a driver's overflow error.
        raise ValueError(f"{what} must be at most {MAX_BIGINT}, got {value!r}")
    return value


def check_limit(value: object, what: str, minimum: int = 1) -> int | None:
    """A limit: None (no limit) or a count."""
    return None if value is None else check_count(value, what, minimum)


def key_id_of(reference: str) -> int | None:
    """The key id that ``reference`` names, when it is one: ASCII digits only (ids are printed
    that way). ``spigot keys revoke 3``, ``GET /admin/keys/3`` and ``--key 3`` all read their
    argument through this, after trying it as a name.

    Not ``int()``: that also reads ``" 3"``, ``"+3"``, ``"1_000"`` and other scripts' digits
    (``"٣"``), which would make such names unreachable by name. ``"²"`` is a digit to
    ``str.isdigit`` but no number at all (``int("²")`` fails): a name, not an id.
    """
    if reference.isascii() and reference.isdecimal():
        return int(reference)
    return None


def check_key_name(name: object) -> str:
    """A key name: a non-empty string without edge spaces that ``key_id_of`` does not read as
    an id. Names and ids share one argument everywhere a key is looked up, so a name of
    digits would be ambiguous (is ``12`` the key named "12" or key 12?)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"a key name must be a non-empty string without edge spaces: {name!r}")
    if key_id_of(name) is not None:
        raise ValueError(f"a key name cannot be only digits: {name!r}")
    return name
