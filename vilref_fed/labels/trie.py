"""A regular expression built from a character trie of many literal terms.

Python's `re` tries alternatives one after the other; a flat alternation of thousands of synonyms would
be re-scanned branch by branch at every position. A trie-shaped pattern shares prefixes, so each
position costs about one character-class test, and greedy optional tails give the longest match first.
"""

from __future__ import annotations

import re

SEP = "\x00"  # stands for "any run of spaces, tabs or hyphens, possibly none" inside a term
_SEP_PATTERN = r"[ \t\-]*"
_END = ""


def _insert(trie: dict, term: str) -> None:
    node = trie
    for ch in term:
        node = node.setdefault(ch, {})
    node[_END] = {}


def _unit(ch: str) -> str:
    return _SEP_PATTERN if ch == SEP else re.escape(ch)


def _pattern(node: dict) -> str:
    terminal = _END in node
    children = sorted((ch, child) for ch, child in node.items() if ch != _END)
    if not children:
        return ""
    # Single characters that end a term collapse into one character class.
    leaves = [ch for ch, child in children if set(child) == {_END} and ch != SEP]
    branches = [
        _unit(ch) + _pattern(child) for ch, child in children if not (set(child) == {_END} and ch != SEP)
    ]
    # A separator may match nothing, so literal continuations are tried before it.
    branches.sort(key=lambda b: b.startswith(_SEP_PATTERN))
    if leaves:
        leaf = re.escape(leaves[0]) if len(leaves) == 1 else "[" + "".join(re.escape(c) for c in leaves) + "]"
        branches.insert(len([b for b in branches if not b.startswith(_SEP_PATTERN)]), leaf)
    if len(branches) == 1 and not terminal:
        return branches[0]
    return "(?:" + "|".join(branches) + ")" + ("?" if terminal else "")


def trie_pattern(terms: list[str]) -> str:
    """A pattern matching any of `terms` (longest first at each position); SEP in a term matches [ \\t-]*."""
    trie: dict = {}
    for term in terms:
        if term:
            _insert(trie, term)
    return _pattern(trie) or "(?!)"
