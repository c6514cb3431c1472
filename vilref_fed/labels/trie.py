"""A regular expression built from a character trie of many literal terms.

Python's `re` tries alternatives one after the other; a flat alternation of thousands of synonyms would
be re-scanned branch by branch at every position. A trie-shaped pattern shares prefixes, and because
its top level is an alternation of plain literals, `re` derives a first-character set from it and skips
impossible start positions in C. Greedy optional tails give the longest match first.
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


def _pattern(node: dict, after_first: str = "", top: bool = False) -> str:
    terminal = _END in node
    children = sorted((ch, child) for ch, child in node.items() if ch != _END)
    if not children:
        return ""
    branches = []
    leaves = []
    for ch, child in children:
        if not top and ch != SEP and set(child) == {_END}:
            leaves.append(ch)  # single characters ending a term collapse into one class
        else:
            branches.append(_unit(ch) + (after_first if top else "") + _pattern(child))
    # A separator may match nothing, so literal continuations are tried before it.
    branches.sort(key=lambda b: b.startswith(_SEP_PATTERN))
    if leaves:
        leaf = re.escape(leaves[0]) if len(leaves) == 1 else "[" + "".join(re.escape(c) for c in leaves) + "]"
        branches.insert(sum(not b.startswith(_SEP_PATTERN) for b in branches), leaf)
    if len(branches) == 1 and not terminal:
        return branches[0]
    return "(?:" + "|".join(branches) + ")" + ("?" if terminal else "")


def trie_pattern(terms: list[str], after_first: str = "") -> str:
    """A pattern matching any of `terms`, longest first at each position; SEP matches [ \\t-]*.

    `after_first` is inserted right after the first character of every term: a fixed-width lookbehind
    there (e.g. a word-boundary test) keeps the top level a plain literal alternation.
    """
    trie: dict = {}
    for term in terms:
        if term:
            _insert(trie, term)
    return _pattern(trie, after_first, top=True) or "(?!)"
