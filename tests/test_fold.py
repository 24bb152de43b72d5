"""The builder's fold in C (_fold.c) is the Python loop it replaces: the same shards, the same
objects stored, the same interner calls, and the same refusal of what is not a piece of grants."""

from __future__ import annotations

import random

import pytest

from authz_sidecar.model import engine

try:
    from authz_sidecar.model._fold import fold
except ImportError:  # pragma: no cover - the failure below says what is missing
    fold = None  # type: ignore[assignment]

MASK = engine.SHARDS - 1


def test_the_fold_is_built() -> None:
    """make venv builds it; a fresh clone's tests fail here, not later, where it was not."""
    assert fold is not None, "authz_sidecar/model/_fold.c is not built (pip install -e . with a C compiler)"
    assert engine.fold_piece is fold


def _pieces(seed: int) -> list[tuple[list[str], list[frozenset[str]], list[str | None]]]:
    """Random pieces: principals repeated within and across pieces (a second grant unions), some
    scoped (some in the same scope twice), handle sets drawn from a few, so unions repeat."""
    rng = random.Random(seed)  # noqa: S311 - test data, not a secret
    handles = [frozenset({"a:x"}), frozenset({"a:y"}), frozenset({"a:x", "b:z"}), frozenset()]
    names = [f"p{i}-{'é' if i % 11 == 0 else ''}" for i in range(300)]
    pieces = []
    for _ in range(20):
        size = rng.randrange(0, 120)
        principals = [rng.choice(names) for _ in range(size)]
        sets = [rng.choice(handles) for _ in range(size)]
        scopes = [rng.choice([None, None, "s1", "s2"]) for _ in range(size)]
        pieces.append((principals, sets, scopes))
    return pieces


def _fold_all(step: engine.FoldPiece, seed: int) -> tuple[engine.Unscoped, engine.Scoped, list[frozenset[str]]]:
    interned: list[frozenset[str]] = []
    interner = engine.Interner()

    def intern(value: frozenset[str]) -> frozenset[str]:
        interned.append(value)
        return interner(value)

    unscoped: engine.Unscoped = tuple({} for _ in range(engine.SHARDS))
    scoped: engine.Scoped = tuple({} for _ in range(engine.SHARDS))
    for principals, sets, scopes in _pieces(seed):
        # A tuple and a list, as grant columns and looked_up give them.
        step(tuple(principals), sets, tuple(scopes), unscoped, scoped, intern, MASK)
    return unscoped, scoped, interned


@pytest.mark.parametrize("seed", range(5))
def test_c_and_python_fold_alike(seed: int) -> None:
    assert fold is not None
    c_unscoped, c_scoped, c_interned = _fold_all(fold, seed)
    py_unscoped, py_scoped, py_interned = _fold_all(engine._fold_piece, seed)
    assert c_unscoped == py_unscoped and c_scoped == py_scoped
    assert c_interned == py_interned  # the same unions, in the same order
    for c_part, py_part in zip(c_unscoped + c_scoped, py_unscoped + py_scoped, strict=True):
        assert list(c_part) == list(py_part)  # the same insertion order in every shard
    assert any(c_scoped) and any(c_unscoped)


def test_what_is_not_a_piece_is_refused_with_an_error() -> None:
    assert fold is not None
    shards: engine.Unscoped = tuple({} for _ in range(engine.SHARDS))
    scoped: engine.Scoped = tuple({} for _ in range(engine.SHARDS))
    ok = (("p",), [frozenset({"a:x"})], (None,))
    with pytest.raises(ValueError, match="differ in length"):
        fold(("p", "q"), [frozenset()], (None,), shards, scoped, frozenset, MASK)
    with pytest.raises(TypeError, match="tuple of 1024 dicts"):
        fold(*ok, shards[:3], scoped, frozenset, MASK)
    with pytest.raises(ValueError, match="power of two"):
        fold(*ok, shards, scoped, frozenset, 1000)
    with pytest.raises(TypeError, match="unhashable"):
        fold(([],), [frozenset()], (None,), shards, scoped, frozenset, MASK)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fold(("p", "p"), [frozenset({"a"}), 7], (None, None), shards, scoped, frozenset, MASK)  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match="interner"):

        def broken(value: frozenset[str]) -> frozenset[str]:
            raise RuntimeError("the interner failed")

        fold(("q", "q"), [frozenset({"a"}), frozenset({"b"})], (None, None), shards, scoped, broken, MASK)
