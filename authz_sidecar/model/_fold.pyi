"""Types of the C extension built from _fold.c (engine._fold_piece in C)."""

from collections.abc import Callable, Sequence

def fold(
    principals: Sequence[str],
    handle_sets: Sequence[frozenset[str]],
    scopes: Sequence[str | None],
    unscoped: tuple[dict[str, frozenset[str]], ...],
    scoped: tuple[dict[tuple[str, str], frozenset[str]], ...],
    intern: Callable[[frozenset[str]], frozenset[str]],
    mask: int,
    /,
) -> None: ...
