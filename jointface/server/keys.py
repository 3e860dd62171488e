"""API keys and the audit log, in the gallery's database (migration ``0003_api_keys_audit``).

A key is ``jf_`` followed by 43 random URL-safe characters (256 bits); it is
shown once, when created, and only its sha256 is stored, so a copy of the
database does not give anyone a usable key. With that much randomness a
plain sha256 is enough (no slow password hash needed); the hash is looked up
directly, so a check costs one indexed query.

Scopes are ordered: ``read`` may search and list, ``write`` may also enrol,
``admin`` may also delete, rename, merge and calibrate.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from index.errors import GalleryError
from index.models import ApiKey, AuditEntry, utcnow
from index.store import IdentityStore

SCOPES = ("read", "write", "admin")
KEY_PREFIX = "jf_"


class KeyCommandError(GalleryError):
    """A key command failed (unknown name, duplicate name, bad scope)."""


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    scope: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict:
        return {"id": self.id, "name": self.name, "scope": self.scope, "prefix": self.prefix,
                "created_at": self.created_at.isoformat(), "active": self.active,
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
                "last_used_at": self.last_used_at.isoformat() if self.last_used_at else None}


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.scope, row.prefix, row.created_at, row.revoked_at, row.last_used_at)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def scope_allows(granted: str, needed: str) -> bool:
    return SCOPES.index(granted) >= SCOPES.index(needed)


def record(store: IdentityStore, *, actor: str, action: str, target: str, key_id: int | None = None,
           detail: dict | None = None, session=None) -> None:
    """Write one audit entry (in ``session`` when given, so it commits with the change it describes)."""
    entry = AuditEntry(actor=actor, key_id=key_id, action=action, target=target[:255], detail=dict(detail or {}))
    if session is not None:
        session.add(entry)
        return
    with store.session() as own:
        own.add(entry)


def create_key(store: IdentityStore, name: str, scope: str, *, actor: str = "cli") -> tuple[KeyInfo, str]:
    """A new key: its record and the secret (shown once, never stored)."""
    name = name.strip()
    if not name or len(name) > 255 or any(ord(ch) < 32 for ch in name):
        raise KeyCommandError("a key name must be 1 to 255 characters, without control characters")
    if scope not in SCOPES:
        raise KeyCommandError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with store.session() as session:
        if session.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
            raise KeyCommandError(f"a key named {name!r} already exists (revoke it, or choose another name)")
        row = ApiKey(name=name, scope=scope, prefix=secret[:8], secret_sha256=secret_hash(secret))
        session.add(row)
        session.flush()
        record(store, actor=actor, action="key_create", target=name, key_id=None,
               detail={"scope": scope, "key": row.id}, session=session)
        info = _info(row)
    return info, secret


def list_keys(store: IdentityStore) -> list[KeyInfo]:
    with store.session() as session:
        return [_info(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.id))]


def revoke_key(store: IdentityStore, name: str, *, actor: str = "cli") -> KeyInfo:
    with store.session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.name == name))
        if row is None:
            raise KeyCommandError(f"no key named {name!r} (see `jointface keys list`)")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            record(store, actor=actor, action="key_revoke", target=name, detail={"key": row.id}, session=session)
        return _info(row)


def verify(store: IdentityStore, secret: str) -> KeyInfo | None:
    """The active key with this secret, or None (unknown, malformed or revoked)."""
    if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
        return None
    with store.session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.secret_sha256 == secret_hash(secret)))
        if row is None or row.revoked_at is not None:
            return None
        return _info(row)


def audit_entries(store: IdentityStore, limit: int = 100) -> list[dict]:
    with store.session() as session:
        rows = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
        return [{"id": row.id, "at": row.at.isoformat(), "actor": row.actor, "key_id": row.key_id,
                 "action": row.action, "target": row.target, "detail": row.detail} for row in rows]
