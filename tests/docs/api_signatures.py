#!/usr/bin/env python3
# SPDX-FileCopyrightText: 2026 The epx authors
# SPDX-License-Identifier: MIT
"""docs/api.md quotes declarations; this checks each one against the headers so that it cannot drift.

Every ```cpp block of the page that is not an example (no #include, no main) is cut into statements
(at ';', '{' and '}'). A statement that declares a function, constructor or member (a name followed
by a parenthesised parameter list) must appear in some header under include/epx as the same name
with the same parameter list, and a statement that declares a data member or enumerator with a
default must appear as written. Comments and whitespace do not count; `/* ... */` placeholders in
the page (`using Context = /* Host on Host; StreamRef on Cuda */;`) mark what the page abbreviates
and are skipped. Exit 0 when every quoted declaration is found, else 1 with the ones that are not.

usage: api_signatures.py REPO_ROOT [--doc docs/api.md] [--expect-missing N]
(--expect-missing: exit 0 only when exactly N declarations are not found; the drift fixture's test)
"""
import pathlib
import re
import sys


def strip_comments(text: str) -> str:
    """Removes comments and empties string and character literals ("{" in a message is not a brace);
    a /* ... */ comment becomes a placeholder mark (the page's abbreviations)."""
    out, i, n = [], 0, len(text)
    while i < n:
        two = text[i:i + 2]
        if two == "//":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif two == "/*":
            j = text.find("*/", i + 2)
            out.append(" /*PLACEHOLDER*/ ")
            i = n if j < 0 else j + 2
        elif text[i] in "\"'" and not (text[i] == "'" and i > 0 and text[i - 1].isalnum()):  # 1'000 separators
            quote, j = text[i], i + 1
            while j < n and text[j] != quote:
                j += 2 if text[j] == "\\" else 1
            out.append(quote * 2)
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def cpp_blocks(doc: str):
    for m in re.finditer(r"^```cpp\n(.*?)^```", doc, flags=re.S | re.M):
        start_line = doc.count("\n", 0, m.start()) + 2
        yield start_line, m.group(1)


def statements(block: str):
    """Splits a block (comments removed) into statements at ; { } outside parentheses."""
    depth, cur = 0, []
    for ch in block:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if depth == 0 and ch in ";{}":
            s = "".join(cur).strip()
            if s:
                yield s
            cur = []
            continue
        cur.append(ch)
    s = "".join(cur).strip()
    if s:
        yield s


def balanced(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == open_:
            depth += 1
        elif text[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


def declaration_prefix(prefix: str) -> str:
    """What stands before a declared name, less its template heads and requires-clauses: the
    return type and specifiers (`template <class T> requires float_element<T> [[nodiscard]] R`
    -> `[[nodiscard]] R`)."""
    i = 0
    while True:
        while i < len(prefix) and prefix[i].isspace():
            i += 1
        if prefix.startswith("template", i) and "<" in prefix[i:]:
            i = balanced(prefix, prefix.index("<", i), "<", ">")
        elif prefix.startswith("requires", i):
            i += len("requires")
            while True:  # primary (&& | ||) primary ...
                while i < len(prefix) and prefix[i].isspace():
                    i += 1
                if i < len(prefix) and prefix[i] == "(":
                    i = balanced(prefix, i, "(", ")")
                else:
                    m = re.compile(r"[!]?[A-Za-z_][\w:]*").match(prefix, i)
                    i = m.end() if m else i
                    if i < len(prefix) and prefix[i] == "<":
                        i = balanced(prefix, i, "<", ">")
                rest = prefix[i:].lstrip()
                if rest.startswith(("&&", "||")):
                    i = len(prefix) - len(rest) + 2
                    continue
                break
        else:
            return prefix[i:]


def signature(stmt: str):
    """(return type, name, name(params)) of a function-like declaration, or None."""
    stmt = declaration_prefix(stmt)
    m = re.search(r"(operator\s*[^\s(]+|~?[A-Za-z_][A-Za-z_0-9]*)\s*\(", stmt)
    if not m:
        return None
    name = m.group(1)
    if name in ("requires", "decltype", "sizeof", "alignof", "noexcept", "static_assert"):
        return None
    i, depth = m.end() - 1, 0
    returns = stmt[:m.start()]
    for j in range(i, len(stmt)):
        if stmt[j] == "(":
            depth += 1
        elif stmt[j] == ")":
            depth -= 1
            if depth == 0:
                return returns, name, stmt[m.start():j + 1]
    return None


def split_top(params: str):
    """Splits a parameter list at commas outside (), <>, [] and {}."""
    depth, cur, out = 0, [], []
    for ch in params:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


_KEYWORDS = {"const", "volatile", "int", "float", "double", "char", "bool", "long", "short", "unsigned",
             "signed", "void", "auto"}


def unnamed(param: str) -> str:
    """A parameter without its name (the page may name parameters more plainly than the header)."""
    param = param.strip()
    default = ""
    depth = 0
    for i, ch in enumerate(param):  # the default starts at the first '=' outside brackets
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        elif ch == "=" and depth == 0 and param[i - 1:i + 1] != "==" and param[i:i + 2] != "==":
            param, default = param[:i].strip(), param[i:]
            break
    param = re.sub(r"\(\s*([&*]+)\s*[A-Za-z_]\w*\s*\)", r"(\1)", param)  # T (&name)[N] -> T (&)[N]
    m = re.search(r"([A-Za-z_]\w*)$", param)
    if m and m.group(1) not in _KEYWORDS:
        before = param[:m.start()].rstrip()
        if before and not before.endswith("::") and (before[-1] in "&*>" or re.search(r"[A-Za-z_0-9]$", before)):
            param = before
    return squash(param + default)


_SPECIFIERS = r"\[\[nodiscard\]\]|\bstatic\b|\bexplicit\b|\binline\b|\bconstexpr\b|\bconsteval\b|\bfriend\b|" \
              r"\bvirtual\b|\bEPX_HOST_DEVICE\b|\bEPX_[A-Z_]+\b"


def key(sig):
    """(return type, name, parameter types) of a signature; names, specifiers and whitespace dropped."""
    returns, name, text = sig
    params = text[text.index("(") + 1:-1]
    return squash(re.sub(_SPECIFIERS, "", returns)), squash(name), tuple(unnamed(p) for p in split_top(params))


def header_signatures(texts):
    keys = set()
    for text in texts:
        for stmt in statements(strip_comments(text)):
            sig = signature(stmt)
            if sig is not None:
                keys.add(key(sig))
    return keys


def main() -> int:
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    doc_path = root / (sys.argv[sys.argv.index("--doc") + 1] if "--doc" in sys.argv else "docs/api.md")
    headers = sorted(p for ext in ("*.hpp", "*.cuh", "*.h") for p in (root / "include" / "epx").rglob(ext))
    texts = [p.read_text() for p in headers]
    header_text = squash(strip_comments("\n".join(texts)))
    header_keys = header_signatures(texts)
    doc = doc_path.read_text()
    checked, missing = 0, []
    for line, block in cpp_blocks(doc):
        code = strip_comments(block)  # a comment naming epx::something does not make a block an example
        if "#include" in code or "epx::" in code or re.search(r"\bint\s+main\s*\(", code):
            continue  # an example (epx:: names, or whole programs); doc_snippet.cmake checks programs
        for stmt in statements(strip_comments(block)):
            if "/*PLACEHOLDER*/" in stmt or "..." in stmt:
                continue
            sig = signature(stmt)
            if sig is not None:
                checked += 1
                if key(sig) not in header_keys:
                    missing.append((line, " ".join(stmt.split())))
                continue
            elif "=" in stmt and not stmt.startswith(("using", "namespace", "return")):
                want = squash(stmt)  # a data member or enumerator with its default
            else:
                continue
            checked += 1
            if want not in header_text:
                missing.append((line, " ".join(stmt.split())))
    for line, stmt in missing:
        print(f"{doc_path.name} (block from line {line}): not in include/epx: {stmt}")
    print(f"api_signatures: {checked} declarations quoted, {len(missing)} not found in {len(headers)} headers")
    if "--expect-missing" in sys.argv:
        return 0 if checked > 0 and len(missing) == int(sys.argv[sys.argv.index("--expect-missing") + 1]) else 1
    return 1 if missing or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
