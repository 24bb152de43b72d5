"""Large permission sets read in pieces: bounded steps, and only what changed against a parent.

A set of a million grants is ~56 MB of canonical JSON (what ``ctl`` writes to etcd). Reading it
with one ``json.loads`` holds the GIL for a second or more, which every Check waiting for it feels;
and a proposal that changes a few grants of it would be read, checked and compiled whole. Here the
document's ``grants`` array is cut into pieces of about :data:`PIECE` bytes at grant boundaries and
each piece is parsed and checked on its own (under a millisecond each: between them, a thread
waiting for the GIL gets it within the build's switch interval, 0.1 ms).

Against a parent (the active set a proposal was made from), pieces whose bytes are the parent's,
found by their digest, are not parsed again: their grants are the parent's. What is left is
parsed, and the principals whose grants differ are returned, so that the compiled set can be
derived from the parent's (:meth:`authz_sidecar.model.snapshot.CompileCache.derived`).

Exactly as strict as :func:`authz_sidecar.documents.load_document` +
:func:`~authz_sidecar.documents.parse_permission_set`: the parts around the grants go through
them, each piece through the same strict JSON (duplicate keys refused) and the same grant checks,
and a document this reader does not recognise, or finds anything wrong with, is read again whole
the ordinary way, so that the refusal (or the value) is exactly that one's.
tests/test_bigsets.py checks the equivalence on random documents.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from authz_sidecar.documents.checks import MAX_PRINCIPAL_LEN
from authz_sidecar.documents.loading import json_object, load_document
from authz_sidecar.documents.parsers import GrantReader, parse_permission_set
from authz_sidecar.errors import DocumentError
from authz_sidecar.model.pacing import pause
from authz_sidecar.model.values import Grant, GrantColumns, Grants, PermissionSet, grant_rows

# Bytes of grants per piece: ~550 grants, under a millisecond to parse and check.
PIECE = 32 * 1024
_GRANTS = b',"grants":['
# Where a grant starts in canonical JSON, after the one before it (store.layout cuts chunks there).
GRANT_BOUNDARY = b'},{"principal":"'
_FIRST = b'{"principal":"'
# Bytes of a piece's start looked for when finding it again after a change (it is then confirmed
# by its digest).
_FIRST_BYTES = 160
# The declared changes after the grants are looked for in this many bytes at the end (more: the
# document is read whole).
_TAIL_BYTES = 1024 * 1024
# How far past a change a piece of the parent is looked for, and how many pieces ahead.
_LOOKAHEAD = 16

# A stored set's text: bytes, or the mapping the etcd source gathers its chunks into.
Text = bytes | mmap.mmap
_decoder = json.JSONDecoder(object_pairs_hook=json_object)
_plain = json.JSONDecoder()

# A piece of canonical grant text taken apart: principals, roles as written, scopes, and whether
# the principals are known to pass their checks (but for the magic words).
Taken = tuple[Sequence[str], Sequence[str], Sequence[str], bool]
split_in_c: Callable[[str, int], Taken | None] | None
try:  # the reader in C (_granttext.c); without a C compiler, the pattern alone
    from authz_sidecar.documents import _granttext

    split_in_c = _granttext.split
except ImportError:  # pragma: no cover - built wherever the tests run (tests/test_granttext.py)
    split_in_c = None


@dataclass(frozen=True, slots=True)
class Piece:
    digest: bytes
    size: int  # bytes
    first: bytes  # its first bytes, to find it in another document
    start: int  # index of its first grant in the set's grants
    count: int
    # The role combinations its grants use (a child that reuses it checks them against its roles).
    combinations: frozenset[tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class BigSet:
    """A set read in pieces, and what a child read against it needs."""

    permissions: PermissionSet
    pieces: tuple[Piece, ...]
    # Principals whose grants differ from the parent's it was read against (None: read whole, or
    # sharing less than half of its grants with the parent).
    changed: frozenset[str] | None = None


# hashlib lets the GIL go while it hashes this many bytes or more (HASHLIB_GIL_MINSIZE).
_GIL_FREE_HASH = 2048


def _digest(data: memoryview | bytes) -> bytes:
    """A piece's digest, hashed with the GIL held.

    SHA-256 rather than BLAKE2b: with the CPU's SHA instructions (through OpenSSL) half the time,
    18 against 35 us per piece here. Truncated: 128 bits are plenty to tell pieces apart.

    In slices hashlib hashes without letting the GIL go: given the whole piece, it lets it go for
    ~18 us and takes it back before a thread woken for it is running. Such a waiter then sees the
    GIL change hands, so it does not ask for it after the switch interval; with a release every
    piece it asked too rarely. A thread sleeping 1 ms beside a cold 1,000,000-grant build waited
    up to 17-59 ms for the GIL, against 3-6 ms with the hashing in slices (+1.4 us a piece)."""
    hashed = hashlib.sha256()
    for at in range(0, len(data), _GIL_FREE_HASH - 1):
        hashed.update(data[at : at + _GIL_FREE_HASH - 1])
    return hashed.digest()[:16]


def _cut(region: Text, start: int, end: int) -> list[tuple[int, int]]:
    """Pieces of about PIECE bytes over region[start:end] (whole grants), cut at grant boundaries."""
    cuts = []
    while start < end:
        at = region.find(GRANT_BOUNDARY, start + PIECE, end)
        if at < 0:
            cuts.append((start, end))
            break
        cuts.append((start, at + 1))
        start = at + 2
    return cuts


class _UnrecognisedError(Exception):
    """Not a document this reader splits: read it whole."""


def _split(document: Text) -> tuple[dict[str, Any], int, int]:
    """The members other than grants, and where the grants' elements are: document[start:end]."""
    at = document.find(_GRANTS)
    if at < 0 or document[:1] != b"{":
        raise _UnrecognisedError
    start = at + len(_GRANTS)
    if document[start : start + 1] == b"]":
        end = start
    else:
        # Canonical JSON puts the declared changes after the grants; anything else after them
        # ends the document, and the grants end at the last '}]' (a wrong guess fails to parse).
        # (Looked for near the end only: a search over tens of megabytes holds the GIL.)
        near_end = max(start, len(document) - _TAIL_BYTES)
        changes = document.rfind(b'],"changes":[', near_end)
        end = changes if changes >= 0 else document.rfind(b"}]", near_end) + 1
        if end <= start or document[start : start + len(_FIRST)] != _FIRST:
            raise _UnrecognisedError
    tail = document[end + 1 :]
    if tail != b"}" and not tail.startswith(b","):
        raise _UnrecognisedError
    try:
        head = _decoder.decode(document[:at].decode() + "}")
        rest = _decoder.decode("{" + tail[1:].decode()) if tail != b"}" else {}
    except (ValueError, DocumentError):
        raise _UnrecognisedError from None
    if not isinstance(head, dict) or not isinstance(rest, dict) or "grants" in head or "grants" in rest:
        raise _UnrecognisedError
    if tail != b"}" and not rest:
        raise _UnrecognisedError  # a comma with no member after it: not JSON, refused whole
    if head.keys() & rest.keys():
        raise _UnrecognisedError
    return {**head, **rest}, start, end


def read_set(
    document: Text,
    name: str,
    parent: BigSet | None = None,
) -> BigSet:
    """The set stored as `document` (named `name` in refusals), read piece by piece, against
    `parent` when given."""
    try:
        return _read(document, name, parent)
    except (_UnrecognisedError, DocumentError, ValueError, RecursionError):
        pass
    permissions = parse_permission_set(load_document(bytes(document), name), name)
    return BigSet(permissions, ())


def _read(document: Text, name: str, parent: BigSet | None) -> BigSet:
    members, start, end = _split(document)
    members["grants"] = []
    base = parse_permission_set(members, name)
    reader = GrantReader(base.roles, name)
    grants: list[Sequence[Grant]] = []  # per piece
    count = 0
    pieces: list[Piece] = []
    view = memoryview(document)
    added: list[GrantColumns] = []  # the pieces parsed (against a parent: what may differ from it)
    plan = _match(document, view, start, end, parent) if parent is not None else [(None, start, end)]
    if not reader.valid({c for p, _a, _b in plan if p is not None for c in p.combinations}):
        raise _UnrecognisedError  # a role the parent's grants use is gone: read whole, refused there
    for same, a, b in plan:
        pause()
        if same is not None and parent is not None:
            grants.append(parent.permissions.grants[same.start : same.start + same.count])
            pieces.append(replace(same, start=count))
            count += same.count
            continue
        for x, y in _cut(document, a, b):
            pause()
            chunk = view[x:y]
            parsed = _piece(str(chunk, "utf-8"), reader, count)
            first = bytes(view[x : min(y, x + _FIRST_BYTES)])
            pieces.append(Piece(_digest(chunk), y - x, first, count, len(parsed), frozenset(parsed.roles)))
            grants.append(parsed)
            count += len(parsed)
            if parent is not None:
                added.append(parsed)
    changed: frozenset[str] | None = None
    reused = sum(p.count for p, _a, _b in plan if p is not None)
    if parent is not None and reused * 2 >= len(parent.permissions.grants):
        # Mostly the parent's: what differs is worth naming (a set sharing little with it is
        # compiled whole, and its impact found by comparing the compiled sets).
        used = {id(p) for p, _a, _b in plan if p is not None}
        removed: list[tuple[str, tuple[str, ...], str | None]] = []
        for piece in parent.pieces:
            pause()
            if id(piece) not in used:
                removed.extend(grant_rows(parent.permissions.grants[piece.start : piece.start + piece.count]))
        # (Counted as rows only here: a Grant made per grant parsed would be a million fresh tuples
        # for a set sharing nothing, freed in one C call of ~70 ms as this returns.)
        pause()
        before, after = Counter(removed), Counter(grant_rows(Grants(added)))
        pause()
        changed = frozenset(g[0] for g in (before - after)) | frozenset(g[0] for g in (after - before))
        pause()
    return BigSet(replace(base, grants=Grants(grants)), tuple(pieces), changed)


# A grant as canonical JSON writes it (what `ctl` stores): its fields in this order, no whitespace,
# no escapes, and a comma after it unless it is the piece's last.
_TEXT = r'[^"\\\x00-\x1f]*'
_GRANT = re.compile(
    rf'\{{"principal":"({_TEXT})","roles":\[("{_TEXT}"(?:,"{_TEXT}")*)\](?:,"scope":"({_TEXT})")?\}}(,?)'
)
_GRANT_CHARS = len('{"principal":"","roles":[]}')
_SCOPE_CHARS = len(',"scope":""')


def _piece(text: str, reader: GrantReader, offset: int) -> GrantColumns:
    """A piece's grants (the set's from index `offset` on), checked.

    Canonical text is taken apart into the strings a grant is made of, without a dict and a list
    per grant as JSON parsing makes them: by the reader in C (:mod:`._granttext`) where it was
    built and the text is one byte per character, else by :func:`_by_pattern`, which accepts the
    same text and more. Anything else is parsed as JSON (:func:`_rows`).
    """
    taken = split_in_c(text, MAX_PRINCIPAL_LEN) if split_in_c is not None else None
    if taken is None:
        taken = _by_pattern(text)
    if taken is not None:
        principals, roles, scopes, plain = taken
        return reader.take(principals, roles, scopes, offset, plain=plain)
    return reader.read(_rows(text), offset)


def _by_pattern(text: str) -> Taken | None:
    """Canonical grant text taken apart by one regular expression, as columns: each grant's
    principal, its roles as written between the brackets, its scope ('' for none), and False (its
    principals are still to be checked); None when the text is not exactly such grants.

    It is taken only when the matches tile the text exactly: their lengths, worked out from the
    strings found, add up to the text's (a scope written as "" is counted as absent and fails that
    sum), and every grant but the last ends with its comma. Then the text is exactly those grants,
    a valid JSON array's elements with every string free of escapes, so each string found is its
    JSON value.
    """
    found = _GRANT.findall(text)
    if not found:
        return None
    principals, roles, scopes, commas = zip(*found, strict=True)
    count = len(found)
    written = (
        count * _GRANT_CHARS
        + (count - scopes.count("")) * _SCOPE_CHARS
        + count
        - 1
        + sum(map(len, principals))
        + sum(map(len, roles))
        + sum(map(len, scopes))
    )
    if written == len(text) and commas[-1] == "" and commas.count(",") == count - 1:
        return principals, roles, scopes, False
    return None


# JSON's whitespace: after a quote it could put a key out of _rows' count (looked for alone first,
# which is a memchr; a quote is in every few bytes).
_WHITESPACE = (" ", "\n", "\t", "\r")


def _rows(text: str) -> list[Any]:
    """A piece's grants as parsed JSON, duplicate keys refused.

    Parsed without the strict hook (which builds each object from a list of pairs in Python:
    twice the time of the plain parse, 0.35 of 0.7 ms per piece), then proven free of duplicate
    keys by counting. With no backslash in the text, no string holds a quote, so every quote
    delimits a string; with no whitespace after a quote, every key is followed directly by ':'.
    Then each key written is one '":' (and a string opening with ':' one more), so if the parsed
    objects hold as many keys as there are '":', no key was written twice. Otherwise, or with
    anything the count cannot see, the piece is parsed strictly, which refuses a duplicate as the
    whole read does. (Nested objects and keys other than a grant's fields are refused by the grant
    checks, and any refusal reads the document again whole.)
    """
    document = "[" + text + "]"
    if "\\" not in text and not any(c in text and '"' + c in text for c in _WHITESPACE):
        rows = _plain.decode(document)
        if type(rows) is list and set(map(type, rows)) <= {dict} and sum(map(len, rows)) == text.count('":'):
            return rows
    return _decoder.decode(document)  # type: ignore[no-any-return]


def _match(
    document: Text, view: memoryview, start: int, end: int, parent: BigSet
) -> list[tuple[Piece | None, int, int]]:
    """The grants region as a plan: the parent's pieces found in it, in order, and the regions
    between them to parse (None)."""
    plan: list[tuple[Piece | None, int, int]] = []
    pieces = parent.pieces
    i, at = 0, start

    def same(piece: Piece, x: int) -> bool:
        y = x + piece.size
        return y <= end and (y == end or document[y] == 0x2C) and _digest(view[x:y]) == piece.digest

    while at < end:
        pause()
        if i < len(pieces) and same(pieces[i], at):
            plan.append((pieces[i], at, at + pieces[i].size))
            at += pieces[i].size + 1
            i += 1
            continue
        found = None
        reach = end if i >= len(pieces) else min(end, at + 4 * pieces[i].size + 4 * PIECE)
        for j in range(i + 1, min(len(pieces), i + _LOOKAHEAD)):
            x = document.find(pieces[j].first, at, reach)
            while x >= 0 and not ((x == at or document[x - 1] == 0x2C) and same(pieces[j], x)):
                x = document.find(pieces[j].first, x + 1, reach)
            if x >= 0:
                found = (j, x)
                break
        if found is None:
            plan.append((None, at, end))
            break
        j, x = found
        if x > at:
            plan.append((None, at, x - 1))
        i, at = j, x
    return plan
