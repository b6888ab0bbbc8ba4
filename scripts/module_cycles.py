#!/usr/bin/env python3
"""Module dependency graph of a Rust crate's src/, and its cycles.

Edges come from every `crate::NAME` (including grouped `use crate::{a::X, b::Y}`) and every
non-test `super::NAME` in code; comments and doc comments (intra-doc links) are ignored.
`crate::ITEM` for an item re-exported by lib.rs is resolved to the module defining it.
Edges used only inside `#[cfg(test)]` blocks are counted too, and marked `(test)`.
Usage: modcycles.py CRATE_SRC_DIR [...]
"""
import os
import re
import sys


def strip_comments(text):
    out, i, n = [], 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == '\\':
                out.append(text[i + 1:i + 2])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
        elif text.startswith('//', i):
            j = text.find('\n', i)
            i = n if j < 0 else j
        elif text.startswith('/*', i):
            j = text.find('*/', i)
            i = n if j < 0 else j + 2
        elif c == '"':
            in_str = True
            out.append(c)
            i += 1
        elif c == '\'' and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:i + 4])
            out.append(m.group(0))
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return ''.join(out)


def test_spans(code):
    """Byte ranges of items marked #[cfg(test)] (brace-matched)."""
    spans = []
    for m in re.finditer(r'#\[cfg\(test\)\]', code):
        j = code.find('{', m.end())
        semi = code.find(';', m.end())
        if j < 0 or (0 <= semi < j):
            continue
        depth, k = 0, j
        while k < len(code):
            if code[k] == '{':
                depth += 1
            elif code[k] == '}':
                depth -= 1
                if depth == 0:
                    break
            k += 1
        spans.append((m.start(), k + 1))
    return spans


def grouped_names(body):
    """Top-level first path segments inside `{...}` of a grouped use."""
    names, depth, cur = [], 0, ''
    for c in body:
        if c == '{':
            depth += 1
        elif c == '}':
            depth -= 1
        elif c == ',' and depth == 0:
            names.append(cur)
            cur = ''
            continue
        if depth == 0 or c not in '{}':
            cur += c if depth == 0 else ''
    names.append(cur)
    return [re.split(r'::|\s', n.strip())[0] for n in names if n.strip()]


def analyse(src):
    files = {}
    for root, _, fs in os.walk(src):
        for f in fs:
            if f.endswith('.rs'):
                rel = os.path.relpath(os.path.join(root, f), src)
                name = rel[:-3].replace(os.sep, '::')
                name = re.sub(r'(::)?mod$', '', name)
                files[name if name not in ('lib', 'main') else ''] = os.path.join(root, f)
    top = {n.split('::')[0] for n in files if n}
    lib = strip_comments(open(files[''] if '' in files else '/dev/null').read())
    reexport = {}
    for m in re.finditer(r'pub use (\w+)::(\{[^}]*\}|\w+);', lib):
        items = m.group(2).strip('{}').split(',')
        for it in items:
            it = it.strip().split(' as ')[-1].strip()
            if it:
                reexport[it] = m.group(1)
    edges = {}  # (a, b) -> set of kinds
    unresolved = set()
    for mod, path in files.items():
        if not mod:
            continue
        me = mod.split('::')[0]
        code = strip_comments(open(path).read())
        spans = test_spans(code)
        refs = []
        for m in re.finditer(r'\bcrate::\{', code):
            j, depth = m.end() - 1, 0
            k = j
            while k < len(code):
                depth += code[k] == '{'
                depth -= code[k] == '}'
                if depth == 0:
                    break
                k += 1
            refs += [(m.start(), n) for n in grouped_names(code[j + 1:k])]
        refs += [(m.start(), m.group(1)) for m in re.finditer(r'\bcrate::(\w+)', code)]
        refs += [(m.start(), m.group(1)) for m in re.finditer(r'\bsuper::(\w+)', code)
                 if not any(a <= m.start() < b for a, b in spans)]
        for pos, name in refs:
            target = name if name in top else reexport.get(name)
            if target is None:
                unresolved.add((me, name))
                continue
            if target == me:
                continue
            kind = 'test' if any(a <= pos < b for a, b in spans) else 'code'
            edges.setdefault((me, target), set()).add(kind)
    return sorted(top), edges, unresolved


def sccs(nodes, adj):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    for v in nodes:
        if v not in index:
            visit(v)
    return [sorted(c) for c in out if len(c) > 1]


for src in sys.argv[1:]:
    nodes, edges, unresolved = analyse(src)
    print(f'== {src}: {len(nodes)} modules, {len(edges)} edges')
    for (a, b), kinds in sorted(edges.items()):
        print(f'  {a} -> {b}' + ('' if 'code' in kinds else '  (test)'))
    for me, name in sorted(unresolved):
        print(f'  ? {me}: crate::{name} unresolved')
    for label, keep in (('all code incl. tests', lambda k: True), ('non-test code', lambda k: 'code' in k)):
        adj = {}
        for (a, b), kinds in edges.items():
            if keep(kinds):
                adj.setdefault(a, []).append(b)
        cyc = sccs(nodes, adj)
        print(f'  cycles ({label}): ' + ('none' if not cyc else '; '.join(' <-> '.join(c) for c in cyc)))
