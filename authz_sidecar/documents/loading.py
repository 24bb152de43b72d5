"""Reading a document's text (YAML or JSON, as bytes or str) into plain data, or refusing it.

Strict because these documents decide who may do what: a duplicate key hides one of its values,
so it is refused with its path and line; an error names the file, line and column in one line.
Large generated documents are usually JSON and go through the C parser.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from authz_sidecar.errors import DocumentError


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate mapping keys instead of keeping the last one."""

    document = ""
    root: yaml.Node | None = None

    def construct_document(self, node: yaml.Node) -> Any:
        self.root = node  # where a duplicate key's path is looked up from
        return super().construct_document(node)


def _node_path(root: yaml.Node | None, target: yaml.Node) -> str:
    """The field path of `target` under `root` ('roles', 'grants[2]'), in the form every other
    refusal uses; searched only when there is an error to report. Aliases can make the tree a
    graph, so each node is visited once."""
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    visited: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                stack.append((value, f"{path}.{name}" if path else str(name)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((value, f"{path}[{i}]") for i, value in enumerate(node.value))
    return ""


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key (a list): the mapping's own constructor refuses it
            break
        if first is not None:
            parent = _node_path(loader.root, node)
            raise DocumentError(
                f"duplicate key at {_at(key_node.start_mark)} (first at {_at(first.start_mark)})",
                document=loader.document,
                field=f"{parent}.{key}" if parent else str(key),
                value=key,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise DocumentError(f"duplicate key {key!r}", value=key)
            seen.add(key)
    return result


def _yaml_error(exc: yaml.YAMLError, text: str) -> str:
    """A YAML parser's error as one line: where, then what (PyYAML's own spans several lines)."""
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        at = exc.position
        line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        return f"line {line}, column {column}: not valid YAML: character #x{exc.character:04x}: {exc.reason}"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        what = " ".join(str(exc.problem).split())
        context = ""
        if exc.context:
            started = exc.context_mark
            where = f" at {_at(started)}" if started is not None and started.line != exc.problem_mark.line else ""
            context = f" ({' '.join(exc.context.split())}{where})"
        return f"{_at(exc.problem_mark)}: not valid YAML: {what}{context}"
    return f"not valid YAML: {' '.join(str(exc).split())}"


def load_document(text: str | bytes, document: str) -> Any:
    """Parse JSON or YAML text with duplicate keys refused.

    Text that starts with '{' is parsed as JSON by the C json module: large generated documents
    (a million grants) are written as JSON, and PyYAML would take minutes over them.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DocumentError(f"not UTF-8 ({exc.reason} at byte {exc.start})", document=document) from None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=json_object)
        except DocumentError as exc:  # a duplicate key; the C parser tells neither where nor the path
            raise DocumentError(f"duplicate key {exc.value!r}", document=document, value=exc.value) from None
        except json.JSONDecodeError as exc:
            message = f"line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"
            raise DocumentError(message, document=document) from None
        except RecursionError:
            raise DocumentError("not valid JSON: nested too deeply", document=document) from None
    try:
        loader = _StrictLoader(text)  # refuses control characters already
        loader.document = document
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise DocumentError(_yaml_error(exc, text), document=document) from None
    except RecursionError:
        raise DocumentError("not valid YAML: nested too deeply", document=document) from None
