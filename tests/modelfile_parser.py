"""Ollama's Modelfile parser (parser/parser.go ParseFile, Ollama v0.32.15), ported rune for
rune so that tests read our Modelfiles the way ``ollama create`` does."""
from __future__ import annotations

NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)
COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
            "parameter", "message", "requires"}


class ModelfileError(Exception):
    pass


def _is_space(r):
    return r in " \t"


def _is_newline(r):
    return r in "\r\n"


def _is_alpha(r):
    return "a" <= r <= "z" or "A" <= r <= "Z"


def _unquote(s: str):
    if s[:3] == '"""':
        if len(s) >= 6 and s[-3:] == '"""':
            return s[3:-3], True
        return "", False
    if s[:1] == '"':
        if len(s) >= 2 and s[-1] == '"':
            return s[1:-1], True
        return "", False
    return s, True


def _next_state(r, cs):
    if cs == NIL:
        if r == "#":
            return COMMENT, ""
        if _is_space(r) or _is_newline(r):
            return NIL, ""
        return NAME, r
    if cs == NAME:
        if _is_alpha(r):
            return NAME, r
        if _is_space(r):
            return VALUE, ""
        raise ModelfileError("invalid command")
    if cs == VALUE:
        if _is_newline(r) or _is_space(r):
            return NIL, r
        return VALUE, r
    if cs == PARAMETER:
        if _is_alpha(r) or r.isdigit() or r == "_":
            return PARAMETER, r
        if _is_space(r):
            return VALUE, ""
        raise ModelfileError("unexpected EOF")
    if cs == MESSAGE:
        if _is_alpha(r):
            return MESSAGE, r
        if _is_space(r):
            return VALUE, ""
        raise ModelfileError("unexpected EOF")
    if cs == COMMENT:
        return (NIL, "") if _is_newline(r) else (COMMENT, "")
    raise ModelfileError("bad state")


def _printable(r: str) -> bool:
    return r != "" and (r.isprintable() or r == " ")


def parse(text: str) -> list[tuple[str, str]]:
    """[(command, value)], command 'model' for FROM and the parameter name for PARAMETER."""
    cmds, cur, buf, name, role = [], NIL, [], None, ""
    for r in text:
        nxt, r = _next_state(r, cur)
        if nxt != cur:
            if cur == NAME:
                word = "".join(buf)
                if word.lower() not in COMMANDS:
                    raise ModelfileError(f"invalid command {word!r}")
                low = word.lower()
                if low == "from":
                    name = "model"
                elif low == "parameter":
                    nxt = PARAMETER
                elif low == "message":
                    nxt, name = MESSAGE, low
                else:
                    name = low
            elif cur == PARAMETER:
                name = "".join(buf)
            elif cur == MESSAGE:
                role = "".join(buf)
            elif cur == VALUE:
                s, ok = _unquote("".join(buf).strip())
                if not ok or _is_space(r):
                    buf.append(r)
                    continue
                if role:
                    s, role = f"{role}: {s}", ""
                cmds.append((name, s))
            buf = []
            cur = nxt
        if _printable(r):
            buf.append(r)
    if cur == VALUE:
        s, ok = _unquote("".join(buf).strip())
        if not ok:
            raise ModelfileError("unexpected EOF")
        cmds.append((name, f"{role}: {s}" if role else s))
    elif cur not in (NIL, COMMENT):
        raise ModelfileError("unexpected EOF")
    if not any(c == "model" for c, _ in cmds):
        raise ModelfileError("no FROM line")
    return cmds
