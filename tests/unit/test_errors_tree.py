"""The error tree drawn in ``errors.py``'s docstring is the tree the code has."""

from __future__ import annotations

import re

from hvstack import errors


def _drawn() -> dict[str, tuple[str | None, int | None]]:
    """Each class in the drawing: its parent and the HTTP status drawn beside it."""
    assert errors.__doc__ is not None
    tree: dict[str, tuple[str | None, int | None]] = {}
    stack: list[str] = []
    for line in errors.__doc__.splitlines():
        match = re.match(r"^    ([│ ]*(?:[├└]── )?)([A-Z]\w+)\b(.*)$", line)
        if match is None:
            continue
        depth = len(match.group(1)) // 4
        del stack[depth:]
        status = re.search(r"\((\d{3})\)\s*$", match.group(3))
        tree[match.group(2)] = (stack[-1] if stack else None,
                                int(status.group(1)) if status else None)
        stack.append(match.group(2))
    return tree


def test_every_error_class_is_drawn_under_its_parent_with_its_status() -> None:
    drawn = _drawn()
    classes = {name: cls for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, errors.HvError)}
    assert set(drawn) == set(classes)
    for name, (parent, status) in drawn.items():
        cls = classes[name]
        assert (cls.__bases__[0].__name__ if parent else None) == parent, name
        if status is not None:
            assert cls.http_status == status, name
