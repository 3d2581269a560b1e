"""``Idempotency-Key`` on ``/send``: a message resent after a 503 or a lost answer is
stored once and answered once.

A 503 from ``/send`` means "not confirmed", not "not stored": the write may have reached
Redis (and a replica) just before the failover cut the answer off. A client that sends
the same key again gets the first message's id back (202, ``"duplicate": true``) and no
second reply from 小X. The key is the client's; the broker's uid is a hash of the user,
the room and the key, so one user's keys never collide with another's.
"""

from __future__ import annotations

import hashlib
import re

from serve.web.security.text import InvalidInput

HEADER = "idempotency-key"
_KEY = re.compile(r"[A-Za-z0-9_\-]{8,64}")


def send_uid(key: str | None, user: str, room: str) -> str | None:
    """The broker uid for a client's key (None without one); 400 for a malformed key."""
    if key is None:
        return None
    if not _KEY.fullmatch(key):
        raise InvalidInput("Idempotency-Key: 8 to 64 letters, digits, '-' or '_'")
    material = "\0".join((user, room, key)).encode("utf-8")
    return "k" + hashlib.sha256(material).hexdigest()[:31]
