"""Channel pointers (``models/<name>/channels/<channel>.json``), signed like manifests, TUF-style.

A pointer names the version a channel serves, for which model and channel, with a ``sequence`` that only grows and
an ``expires`` time, and carries an ed25519 signature by the model key over its canonical JSON. A device accepts a
pointer only when it parses, names the model and channel it asked for, names a valid version, is signed by a key
it trusts, has not expired, and its sequence is not lower than the highest it accepted before (anti-rollback:
a pointer to an older signed version cannot be replayed). An operator who wants an older version pins it by
version instead of by channel.

A pointer may also carry ``capture``, a field-capture policy
(:class:`~edgeloop_core.contract.captures.CapturePolicy`) for the devices that follow the channel, so a fleet's
capture is switched from the cloud (docs/capture.md). It is signed with the rest; a pointer without one has the
same canonical bytes as before the field existed, so every pointer signed earlier still verifies. A device uses the
policy only from a pointer it accepted; its desired file's policy for the model wins where it sets one.

Names, versions and channels all follow :data:`NAME_PATTERN` wherever they enter (:func:`check_name`).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeloop_core.contract.captures import CapturePolicy
from edgeloop_core.contract.manifest import NAME_PATTERN, Signature
from edgeloop_core.errors import ChannelExpired, ChannelRollback, ConfigError, ManifestInvalid, SignatureInvalid

if TYPE_CHECKING:
    from collections.abc import Iterable

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_NAME = re.compile(NAME_PATTERN)
DEFAULT_TTL = timedelta(days=90)
"""How long a published pointer stays valid; re-publish or ``edgeloop pipeline promote`` before it runs out."""


def check_name(value: object, what: str) -> str:
    """``value`` if it is a valid model name, version or channel (:data:`NAME_PATTERN`), else :class:`ConfigError`
    naming ``what``: nothing that becomes an S3 key or a cache path escapes its folder."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = repr(value)[:80]
        raise ConfigError(f"{what} {shown} is not a valid name (lower case letters, digits, '.', '_', '-'; "
                          f"at most 63 characters, starting with a letter or digit)")
    return value


class ChannelPointer(BaseModel):
    """The signed content of a channel pointer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    channel: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    sequence: int = Field(ge=1, description="grows with every move of the channel")
    expires: datetime
    updated_at: datetime | None = None
    capture: CapturePolicy | None = Field(None, description="field-capture policy for the devices that follow "
                                                            "this channel (absent: the pointer sets none)")
    signature: Signature | None = None

    def canonical_bytes(self) -> bytes:
        """What is signed: sorted-key compact JSON of every field except ``signature``; ``capture`` only when the
        pointer has one, and then the fields the pointer's JSON holds (so a device whose policy knows a field more,
        with a default, reads the same bytes)."""
        payload = self.model_dump(mode="json", exclude={"signature", "capture"})
        if self.capture is not None:
            payload["capture"] = self.capture.model_dump(mode="json", exclude_unset=True)
        return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        """The pointer as it is stored: indented JSON, without ``capture`` when it has none (a device older than the
        field refuses a key it does not know)."""
        return self.model_dump_json(indent=2, exclude={"capture"} if self.capture is None else None).encode()


def sign_pointer(name: str, channel: str, version: str, sequence: int, private_key: Ed25519PrivateKey, *,
                 ttl: timedelta = DEFAULT_TTL, now: datetime | None = None,
                 capture: CapturePolicy | None = None) -> ChannelPointer:
    """A pointer from ``name``'s ``channel`` to ``version``, signed by ``private_key``, with the field-capture
    policy ``capture`` when given (stored and signed with every field spelled out)."""
    from edgeloop_core.contract.signing import make_signature

    now = now or datetime.now(timezone.utc)
    spelled = CapturePolicy.model_validate(capture.model_dump(mode="json")) if capture is not None else None
    pointer = ChannelPointer(name=name, channel=channel, version=version, sequence=sequence, expires=now + ttl,
                             updated_at=now, capture=spelled)
    return pointer.model_copy(update={"signature": make_signature(private_key, pointer.canonical_bytes())})


def parse_pointer(data: bytes, name: str, channel: str) -> ChannelPointer:
    """Parse a pointer's bytes; :class:`ManifestInvalid` with one line for anything that is not one for
    ``name``/``channel`` (``{}``, ``[]``, ``null``, a number, a traversal in the version, another model's pointer)."""
    where = f"channel {channel!r} of {name!r}"
    try:
        raw: Any = json.loads(data)
    except ValueError as exc:
        raise ManifestInvalid(f"{where} is not valid JSON") from exc
    if not isinstance(raw, dict):
        raise ManifestInvalid(f"{where} is not a JSON object (got {type(raw).__name__})")
    try:
        pointer = ChannelPointer.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "pointer"
        raise ManifestInvalid(f"{where} is invalid at {field}: {first['msg']}") from exc
    if (pointer.name, pointer.channel) != (name, channel):
        raise ManifestInvalid(f"{where} describes channel {pointer.channel!r} of {pointer.name!r}: refusing it")
    return pointer


def verify_pointer(pointer: ChannelPointer, trusted: Ed25519PublicKey | Iterable[Ed25519PublicKey], *,
                   min_sequence: int = 0, now: datetime | None = None) -> ChannelPointer:
    """Check signature, expiry and anti-rollback; returns ``pointer`` or raises a :class:`SignatureInvalid`."""
    from edgeloop_core.contract.signing import check_signature

    where = f"channel {pointer.channel!r} of {pointer.name!r}"
    if pointer.signature is None:
        raise SignatureInvalid(f"{where} is not signed: publish it with a current pipeline (or pin a version)")
    check_signature(pointer.signature, pointer.canonical_bytes(), trusted, where)
    now = now or datetime.now(timezone.utc)
    expires = pointer.expires if pointer.expires.tzinfo else pointer.expires.replace(tzinfo=timezone.utc)
    if expires <= now:
        raise ChannelExpired(f"{where} expired at {expires.isoformat()}: re-sign it (edgeloop pipeline promote)")
    if pointer.sequence < min_sequence:
        raise ChannelRollback(f"{where} has sequence {pointer.sequence}, lower than {min_sequence} already seen "
                              f"here: refusing a rollback to {pointer.version} (pin a version to go back on purpose)")
    return pointer
