"""A radix tree (compressed trie) of texts: entries that share a prefix share its bytes.

This is the memory manager's compression, as the AIOS paper describes it:
conversation logs saved turn after turn, prompts replayed with the same
system text, notes from one template, all start with the same characters;
the tree stores each distinct prefix once. An entry is a path from the root
to a node; its text is the concatenation of the labels on that path, so
`get` rebuilds it exactly (any Unicode, empty strings, one entry a prefix of
another, identical entries: they share one terminal node with `refs` > 1).

Handles are the terminal `Node` objects. They stay valid across every later
insert and remove of other texts, because the tree only ever

- splits an edge by putting a new node *above* an existing one (the old node
  keeps its identity and the tail of its label), and
- merges a node that no entry ends at and that has one child *into that child*
  (the child keeps its identity and gains the head).

So removal frees shared nodes only when no entry uses them any more and
undoes splits, keeping the invariant that a non-root node no entry ends at
has at least two children.

Sizes: `raw_bytes` is the UTF-8 length of all entries as given, `stored_bytes`
the UTF-8 length of the labels actually held (raw/stored is the sharing
ratio), and `nbytes` the RAM the tree really takes (node objects, label
strings, children tuples or dicts and their keys; see sizing.py for how these
figures were measured), which is what the memory budget counts.
"""
from __future__ import annotations

from typing import Callable, Iterator, TypeVar

from aios.managers.memory.sizing import char_key_bytes, dict_bytes, obj_bytes, utf8_len

S = TypeVar("S")


class Node:
    """One edge label and the node below it. Opaque to callers: a handle."""

    __slots__ = ("label", "parent", "children", "refs")

    def __init__(self, label: str, parent: Node | None, refs: int = 0) -> None:
        self.label = label
        self.parent = parent
        # None, a tuple of up to TUPLE_MAX children, or a dict first character -> child
        self.children: tuple[Node, ...] | dict[str, Node] | None = None
        self.refs = refs  # entries that end here

    def __repr__(self) -> str:
        return f"Node({self.label[:20]!r}, refs={self.refs}, children={len(self.children or ())})"


Handle = Node

# A 4-slot object: 16-byte header + 16-byte GC header + 4 pointers, a multiple of 16
# already (measured: sys.getsizeof and tracemalloc both say 64).
NODE_BYTES = obj_bytes(Node("", None))

# Children: most inner nodes of a radix tree have two or three. A dict for them costs
# 192 bytes (its object and a separate key table), a tuple of two 64: a tuple below
# TUPLE_MAX children (scanned linearly, comparing first characters), a dict above.
# Measured on 2,000 unrelated notes: 520 bytes of overhead per entry with dicts only.
TUPLE_MAX = 8
TUPLE_BACK = 4  # a dict that shrinks to this many children becomes a tuple again


def _container_bytes(kids: tuple[Node, ...] | dict[str, Node] | None) -> int:
    """RAM of a children container, with the key objects of a dict."""
    if kids is None:
        return 0
    if type(kids) is tuple:
        return obj_bytes(kids)
    return dict_bytes(kids) + sum(char_key_bytes(k) for k in kids)  # type: ignore[arg-type]


def _label_node_bytes(node: Node) -> int:
    return NODE_BYTES + obj_bytes(node.label)


def _find_child(node: Node, ch: str) -> Node | None:
    kids = node.children
    if kids is None:
        return None
    if type(kids) is tuple:
        for child in kids:
            if child.label.startswith(ch):
                return child
        return None
    return kids.get(ch)  # type: ignore[union-attr]


def _common_prefix(label: str, text: str, start: int) -> int:
    """Length of the longest common prefix of `label` and `text[start:]` (C-speed comparisons)."""
    n = min(len(label), len(text) - start)
    if text.startswith(label[:n] if n < len(label) else label, start):
        return n
    lo, hi = 0, n  # label[:lo] matches, label[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if text.startswith(label[:mid], start):
            lo = mid
        else:
            hi = mid
    return lo


class RadixTree:
    """Texts in a compressed trie. Not thread-safe: its owner serialises access."""

    __slots__ = ("_root", "raw_bytes", "stored_bytes", "nbytes", "node_count", "handle_count")

    def __init__(self) -> None:
        self._root = Node("", None)
        self.raw_bytes = 0
        self.stored_bytes = 0
        self.nbytes = _label_node_bytes(self._root)
        self.node_count = 1
        self.handle_count = 0

    def __len__(self) -> int:
        return self.handle_count

    # ------------------------------------------------------------------ api
    def insert(self, text: str) -> Handle:
        """Store `text`; return the handle that gets it back."""
        node, i, n = self._root, 0, len(text)
        while i < n:
            child = _find_child(node, text[i])
            if child is None:
                leaf = Node(text[i:], node)
                self._add_child(node, leaf)
                self.nbytes += _label_node_bytes(leaf)
                self.stored_bytes += utf8_len(leaf.label)
                self.node_count += 1
                node = leaf
                break
            label = child.label
            m = _common_prefix(label, text, i)
            if m < len(label):
                child = self._split(child, m)
            node, i = child, i + m
        node.refs += 1
        self.handle_count += 1
        self.raw_bytes += utf8_len(text)
        return node

    def get(self, handle: Handle) -> str:
        """The exact text stored under `handle`."""
        parts: list[str] = []
        node: Node | None = handle
        while node is not None:
            parts.append(node.label)
            node = node.parent
        parts.reverse()
        return "".join(parts)

    def text_bytes(self, handle: Handle) -> int:
        """UTF-8 length of the text under `handle`, without building it."""
        total, node = 0, handle
        while node is not None:
            total += utf8_len(node.label)
            node = node.parent
        return total

    def remove(self, handle: Handle) -> None:
        """Drop one reference to a text; free the nodes no other entry uses and undo splits."""
        if handle.refs <= 0:
            raise ValueError("handle already removed")
        self.raw_bytes -= self.text_bytes(handle)
        self.handle_count -= 1
        handle.refs -= 1
        node = handle
        while node is not self._root and node.refs == 0:
            kids = node.children
            parent = node.parent
            assert parent is not None
            if not kids:  # a leaf nobody ends at: unlink it, then look at its parent
                self._remove_child(parent, node)
                self.nbytes -= _label_node_bytes(node)
                self.stored_bytes -= utf8_len(node.label)
                self.node_count -= 1
                node.parent = None
                node = parent
                continue
            if len(kids) == 1:  # a pass-through node: fold it into its only child
                (child,) = kids.values() if type(kids) is dict else kids  # type: ignore[union-attr]
                self._replace_child(parent, node, child)
                self.nbytes -= (_label_node_bytes(node) + _container_bytes(kids) + obj_bytes(child.label))
                child.label = node.label + child.label
                child.parent = parent
                self.nbytes += obj_bytes(child.label)
                node.parent = node.children = None
                self.node_count -= 1
            break

    def fold(self, step: Callable[[S, str], S], initial: S) -> Iterator[tuple[Handle, S]]:
        """Yield (handle, state) for every node an entry ends at, where a node's state is
        `step(state of its parent, its label)` and the root's is `initial`.

        Lets a caller compute something over every entry's text while touching each
        stored character once (the BM25 scorer counts terms this way), instead of
        rebuilding every entry. Iterative: a tree can be thousands of nodes deep.
        """
        stack: list[tuple[Node, S]] = [(self._root, initial)]
        while stack:
            node, state = stack.pop()
            if node.refs:
                yield node, state
            kids = node.children
            if kids:
                for child in (kids.values() if type(kids) is dict else kids):  # type: ignore[union-attr]
                    stack.append((child, step(state, child.label)))

    # -------------------------------------------------------------- helpers
    def _split(self, child: Node, m: int) -> Node:
        """Put a new node holding `child.label[:m]` between `child` and its parent."""
        parent = child.parent
        assert parent is not None and 0 < m < len(child.label)
        head, tail = child.label[:m], child.label[m:]
        mid = Node(head, parent)
        self._replace_child(parent, child, mid)
        mid.children = (child,)
        self.nbytes -= obj_bytes(child.label)
        child.label, child.parent = tail, mid
        self.nbytes += obj_bytes(tail) + _label_node_bytes(mid) + obj_bytes(mid.children)
        self.node_count += 1
        # stored_bytes is unchanged: the same characters, now on two edges
        return mid

    def _add_child(self, parent: Node, child: Node) -> None:
        kids = parent.children
        if kids is None:
            parent.children = (child,)
            self.nbytes += obj_bytes(parent.children)
        elif type(kids) is tuple:
            before = obj_bytes(kids)
            if len(kids) < TUPLE_MAX:
                parent.children = kids + (child,)
            else:
                parent.children = {c.label[0]: c for c in kids}
                parent.children[child.label[0]] = child
            self.nbytes += _container_bytes(parent.children) - before
        else:
            ch = child.label[0]
            before = dict_bytes(kids)  # type: ignore[arg-type]
            kids[ch] = child  # type: ignore[index]
            self.nbytes += dict_bytes(kids) - before + char_key_bytes(ch)  # type: ignore[arg-type]

    def _remove_child(self, parent: Node, child: Node) -> None:
        kids = parent.children
        if type(kids) is tuple:
            rest = tuple(c for c in kids if c is not child)
            parent.children = rest or None
            self.nbytes += _container_bytes(parent.children) - obj_bytes(kids)
            return
        ch = child.label[0]
        if len(kids) - 1 <= TUPLE_BACK:  # type: ignore[arg-type]
            before = _container_bytes(kids)
            del kids[ch]  # type: ignore[union-attr]
            parent.children = tuple(kids.values()) or None  # type: ignore[union-attr]
            self.nbytes += _container_bytes(parent.children) - before
        else:
            before = dict_bytes(kids)  # type: ignore[arg-type]
            del kids[ch]  # type: ignore[union-attr]
            self.nbytes += dict_bytes(kids) - before - char_key_bytes(ch)  # type: ignore[arg-type]

    @staticmethod
    def _replace_child(parent: Node, old: Node, new: Node) -> None:
        """Swap a child for another whose label starts with the same character (no size change:
        a tuple of the same length, or the same dict key)."""
        kids = parent.children
        if type(kids) is tuple:
            parent.children = tuple(new if c is old else c for c in kids)
        else:
            kids[old.label[0]] = new  # type: ignore[index]

    def audit(self) -> dict[str, int]:
        """Recompute every counter from scratch (tests compare it with the running totals)
        and check the structural invariants."""
        nbytes = stored = raw = nodes = handles = 0
        stack: list[tuple[Node, int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            nodes += 1
            nbytes += _label_node_bytes(node) + _container_bytes(node.children)
            label_len = utf8_len(node.label)
            stored += label_len
            depth += label_len
            raw += node.refs * depth
            handles += node.refs
            if node is not self._root:
                assert node.label, "only the root has an empty label"
                assert node.refs > 0 or len(node.children or ()) >= 2, f"unmerged pass-through node {node!r}"
            kids = node.children
            if kids is not None:
                assert len(kids) > 0, "an empty children container"
                if type(kids) is dict:
                    assert len(kids) > TUPLE_BACK, "a small dict that should be a tuple"
                    pairs = list(kids.items())
                else:
                    assert len(kids) <= TUPLE_MAX, "a tuple of children over TUPLE_MAX"
                    pairs = [(c.label[0], c) for c in kids]
                    assert len({k for k, _ in pairs}) == len(pairs), "two children with one first character"
                for key, child in pairs:
                    assert child.parent is node and child.label[0] == key, "broken parent link or key"
                    stack.append((child, depth))
        return {"nbytes": nbytes, "stored_bytes": stored, "raw_bytes": raw, "node_count": nodes,
                "handle_count": handles}
