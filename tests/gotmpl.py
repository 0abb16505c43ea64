"""A small renderer for the part of Go's text/template that ggufq's Ollama templates use.

Enough to check our TEMPLATE lines without Go: text, ``{{ }}`` actions with ``{{-``/``-}}``
whitespace trimming, ``if``/``else if``/``else``/``end``, ``range`` (with ``$i, $x :=``),
``$x := ...`` and ``$x = ...``, field chains (``.Role``, ``$.System``), string literals,
``true``/``false`` and the functions ``eq``, ``ne``, ``lt``, ``gt``, ``not``, ``and``, ``or``, ``len``,
``index``, ``slice`` with parenthesised arguments. Anything else raises, so a template using
more than this fails the test instead of rendering wrongly.

Semantics follow text/template: a variable is visible from its declaration to the ``end`` of
the enclosing control structure; ``=`` assigns the nearest declaration (Go >= 1.11);
truthiness is Go's (empty string, 0, nil, empty list are false); ``and``/``or`` return an
argument, as in Go.
"""
from __future__ import annotations

import re

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(\()|(\))|(:=)|(=)|(,)|([^\s(),]+))')


class GoTemplateError(Exception):
    pass


def _lex(src: str) -> list[tuple[str, str]]:
    """Template -> [('text', s) | ('action', body)] with trim markers applied."""
    out, pos, trim_next = [], 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            out.append(("text", text))
        body = m.group(2).strip()
        if body.startswith("/*"):
            pass
        else:
            out.append(("action", body))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = src[pos:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        out.append(("text", text))
    return out


def _tokens(body: str) -> list[str]:
    toks, pos = [], 0
    body = body.strip()
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot tokenise {body!r}")
        toks.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
        while pos < len(body) and body[pos].isspace():
            pos += 1
    return toks


# ---------------------------------------------------------------- parse into a tree

def _parse(items, i=0, stop=("end",)):
    nodes = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop or (word == "else" and "else" in stop):
            return nodes, i
        if word == "if":
            node, i = _parse_if(items, i)
            nodes.append(node)
        elif word == "range":
            rest = body[len("range"):].strip()
            m = re.match(r"^(\$\w+)\s*(?:,\s*(\$\w+))?\s*:=\s*(.*)$", rest, re.S)
            if m:
                a, b, expr = m.groups()
                names = (a, b) if b else (None, a)
            else:
                names, expr = (None, None), rest
            inner, i = _parse(items, i + 1, stop=("end", "else"))
            else_nodes = []
            if items[i][1].split(None, 1)[0] == "else":
                else_nodes, i = _parse(items, i + 1, stop=("end",))
            nodes.append(("range", names, _tokens(expr), inner, else_nodes))
            i += 1
        elif word in ("end", "else"):
            raise GoTemplateError(f"unexpected {{{{ {body} }}}}")
        elif word in ("with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{word} is not supported by this renderer")
        else:
            nodes.append(("action", _tokens(body)))
            i += 1
    if stop != ("end",) or nodes is None:
        pass
    return nodes, i


def _parse_if(items, i):
    """items[i] is '{{ if COND }}' or '{{ else if COND }}'; returns (node, index after end)."""
    body = items[i][1]
    cond = body[body.index("if") + 2:]
    then, i = _parse(items, i + 1, stop=("end", "else"))
    else_nodes = []
    kind, body = items[i]
    if body.split(None, 1)[0] == "else":
        rest = body[4:].strip()
        if rest.startswith("if ") or rest == "if":
            node, i = _parse_if(items, i)
            return ("if", _tokens(cond), then, [node]), i
        else_nodes, i = _parse(items, i + 1, stop=("end",))
    return ("if", _tokens(cond), then, else_nodes), i + 1


# ---------------------------------------------------------------- evaluate

def _truth(v) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    if isinstance(v, (int, float)):
        return v != 0
    return True


def _to_text(v) -> str:
    if v is None:
        return "<no value>"
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


class _Scopes:
    def __init__(self, root):
        self.stack = [{"$": root}]

    def push(self):
        self.stack.append({})

    def pop(self):
        self.stack.pop()

    def declare(self, name, value):
        self.stack[-1][name] = value

    def assign(self, name, value):
        for s in reversed(self.stack):
            if name in s:
                s[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")

    def get(self, name):
        for s in reversed(self.stack):
            if name in s:
                return s[name]
        raise GoTemplateError(f"undefined variable {name}")


def _field(obj, names):
    for n in names:
        if not isinstance(obj, dict):
            raise GoTemplateError(f"can't evaluate field {n} in {type(obj).__name__}")
        obj = obj.get(n)          # missingkey=zero, as Ollama parses templates
    return obj


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": lambda a: len(a),
    "gt": lambda a, b: a > b,
    "lt": lambda a, b: a < b,
    "index": lambda a, *ix: _index(a, ix),
    "slice": lambda a, *ix: a[ix[0]:(ix[1] if len(ix) > 1 else None)],
}


def _index(a, ix):
    for i in ix:
        a = a[i]
    return a


def _operand(tok, dot, scopes):
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
    if tok in ("true", "false"):
        return tok == "true"
    if tok == "nil":
        return None
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok == ".":
        return dot
    if tok.startswith("."):
        return _field(dot, tok[1:].split("."))
    if tok.startswith("$"):
        name, _, rest = tok.partition(".")
        v = scopes.get(name)
        return _field(v, rest.split(".")) if rest else v
    raise GoTemplateError(f"unsupported operand {tok!r}")


def _eval(toks, dot, scopes):
    """A pipeline without '|': a command (function call) or a single operand."""
    args, i = [], 0
    while i < len(toks):
        t = toks[i]
        if t == "(":
            depth, j = 1, i + 1
            while depth:
                if j >= len(toks):
                    raise GoTemplateError("unbalanced parentheses")
                depth += {"(": 1, ")": -1}.get(toks[j], 0)
                j += 1
            args.append(("value", _eval(toks[i + 1:j - 1], dot, scopes)))
            i = j
        elif t == "|":
            raise GoTemplateError("pipes are not supported by this renderer")
        else:
            args.append(("tok", t))
            i += 1
    if not args:
        raise GoTemplateError("empty command")
    kind, first = args[0]
    if kind == "tok" and first in ("and", "or"):
        vals = args[1:]
        result = None
        for k, v in vals:
            result = v if k == "value" else _operand(v, dot, scopes)
            if (first == "and") != _truth(result):
                return result
        return result
    if kind == "tok" and first in _FUNCS:
        vals = [v if k == "value" else _operand(v, dot, scopes) for k, v in args[1:]]
        return _FUNCS[first](*vals)
    if len(args) != 1:
        raise GoTemplateError(f"unsupported command {toks!r}")
    return first if kind == "value" else _operand(first, dot, scopes)


def _exec(nodes, dot, scopes, out):
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "action":
            toks = node[1]
            if len(toks) >= 2 and toks[0].startswith("$") and toks[1] in (":=", "="):
                value = _eval(toks[2:], dot, scopes)
                (scopes.declare if toks[1] == ":=" else scopes.assign)(toks[0], value)
            else:
                out.append(_to_text(_eval(toks, dot, scopes)))
        elif kind == "if":
            _, cond, then, else_nodes = node
            scopes.push()
            branch = then if _truth(_eval(cond, dot, scopes)) else else_nodes
            _exec(branch, dot, scopes, out)
            scopes.pop()
        elif kind == "range":
            _, (iname, ename), expr, inner, else_nodes = node
            seq = _eval(expr, dot, scopes) or []
            scopes.push()
            if not seq:
                _exec(else_nodes, dot, scopes, out)
            for i, item in enumerate(seq):
                scopes.push()
                if iname:
                    scopes.declare(iname, i)
                if ename:
                    scopes.declare(ename, item)
                _exec(inner, item, scopes, out)
                scopes.pop()
            scopes.pop()


def render(template: str, data: dict) -> str:
    nodes, i = _parse(_lex(template))
    items = _lex(template)
    if i != len(items):
        raise GoTemplateError(f"unexpected {{{{ {items[i][1]} }}}}")
    out: list[str] = []
    _exec(nodes, data, _Scopes(data), out)
    return "".join(out)
