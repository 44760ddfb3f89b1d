"""The device sources NVRTC compiles, and what the host side reads from them.

The sources are the torch-free headers of ``csrc/include/dspark`` (shipped as
package data under ``dspark_kernels/nvrtc/include/dspark``; a source checkout reads
``csrc/include`` directly). Two things are read from them so that the Python
launcher never keeps a second copy:

* :func:`constants` parses the ``constexpr`` block sizes and splits of
  ``dspark/launch.h`` (``{"vb.kStatsThreads": 128, ...}``);
* :func:`struct` turns a ``struct`` of a header (a launch's parameter block or a
  workspace record) into a :mod:`ctypes` structure with the C layout, so a field
  added to the header needs no edit here.

>>> constants()["vb.kStatsSplit"]
4096
>>> import ctypes; ctypes.sizeof(struct("kv.Move"))
16
"""

from __future__ import annotations

import ast
import ctypes
import functools
import hashlib
import operator
import os
import re

_here = os.path.dirname(os.path.abspath(__file__))


@functools.cache
def include_dir() -> str:
    """The directory holding ``dspark/*.cuh``: the package data, else the source checkout's ``csrc/include``."""
    for cand in (os.path.join(_here, "include"),
                 os.path.join(os.path.dirname(os.path.dirname(_here)), "csrc", "include")):
        if os.path.isfile(os.path.join(cand, "dspark", "launch.h")):
            return cand
    raise FileNotFoundError("dspark_kernels.nvrtc: the device sources (dspark/*.cuh) are not installed "
                            f"(looked in {_here}/include and the source checkout's csrc/include)")


def headers() -> dict[str, str]:
    """``{"dspark/name.cuh": text}`` for every header NVRTC may include (sorted by name)."""
    root = os.path.join(include_dir(), "dspark")
    out = {}
    for name in sorted(os.listdir(root)):
        if name.endswith((".h", ".cuh")):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                out[f"dspark/{name}"] = f.read()
    return out


@functools.cache
def sources_digest() -> str:
    """sha256 of every header's name and text (part of the cache key)."""
    h = hashlib.sha256()
    for name, text in headers().items():
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


# ---------------------------------------------------------------------- constants of launch.h

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
           ast.BitAnd: operator.and_}


def _eval_int(expr: str, known: dict[str, int]) -> int:
    expr = re.sub(r"int64_t\{([^}]*)\}", r"(\1)", expr)
    expr = re.sub(r"(?<=\d)(?:LL|ll|ULL|ull|L|l|u|U)\b", "", expr).replace("/", "//")

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Invert)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ~ev(node.operand)
        if isinstance(node, ast.Name) and node.id in known:
            return known[node.id]
        raise ValueError(f"dspark/launch.h: cannot evaluate {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


@functools.cache
def constants(header: str = "dspark/launch.h") -> dict[str, int]:
    """``{"<namespace>.<name>": value}`` for every ``constexpr int|int64_t`` of ``header``
    (namespaces below ``dspark``)."""
    return _namespaced(_strip_comments(headers()[header]))


def _namespaced(text: str) -> dict[str, int]:
    """The constexpr constants of ``text`` with their namespace path (brace-accurate)."""
    out: dict[str, int] = {}
    stack: list[tuple[str, int]] = []  # (namespace, brace depth at which it opened)
    depth = 0
    for m in re.finditer(r"namespace\s+(\w+)\s*\{|\{|\}|constexpr\s+(?:int|int64_t|int32_t)\s+(\w+)\s*=\s*([^;]+);",
                         text):
        tok = m.group(0)
        if m.group(1):
            depth += 1
            stack.append((m.group(1), depth))
        elif tok == "{":
            depth += 1
        elif tok == "}":
            if stack and stack[-1][1] == depth:
                stack.pop()
            depth -= 1
        elif depth == len(stack):  # namespace scope, not inside a function or struct
            ns = [n for n, _ in stack if n != "dspark"]
            prefix = ".".join(ns)
            scope = {k[len(prefix) + 1:]: v for k, v in out.items() if k.startswith(prefix + ".")}
            out[f"{prefix}.{m.group(2)}" if prefix else m.group(2)] = _eval_int(m.group(3), scope)
    return out


# ---------------------------------------------------------------------- structs -> ctypes

_SCALARS = {
    "int8_t": ctypes.c_int8, "uint8_t": ctypes.c_uint8, "int16_t": ctypes.c_int16, "uint16_t": ctypes.c_uint16,
    "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32, "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64,
    "int": ctypes.c_int32, "unsigned": ctypes.c_uint32, "unsigned int": ctypes.c_uint32,
    "float": ctypes.c_float, "double": ctypes.c_double, "bool": ctypes.c_bool, "char": ctypes.c_char,
    "long long": ctypes.c_int64, "unsigned long long": ctypes.c_uint64,
}


@functools.cache
def _all_text() -> str:
    return "\n".join(_strip_comments(t) for t in headers().values())


@functools.cache
def _struct_index() -> dict[str, str]:
    """``{"vb.Params": body text, ...}``: every struct definition of the headers by namespace path."""
    out: dict[str, str] = {}
    for text in (_strip_comments(t) for t in headers().values()):
        stack: list[tuple[str, int]] = []
        depth = 0
        for m in re.finditer(r"namespace\s+(\w+)\s*\{|struct\s+(\w+)\s*\{|\{|\}", text):
            if m.group(1):
                depth += 1
                stack.append((m.group(1), depth))
            elif m.group(2):
                d, i = 1, m.end()
                while d:
                    d += {"{": 1, "}": -1}.get(text[i], 0)
                    i += 1
                ns = [n for n, _ in stack if n != "dspark"]
                out.setdefault(".".join(ns + [m.group(2)]), text[m.end():i - 1])
                depth += 1  # the struct's own brace, closed by the matching "}" below
            elif m.group(0) == "{":
                depth += 1
            else:
                if stack and stack[-1][1] == depth:
                    stack.pop()
                depth -= 1
    return out


def _struct_body(name: str) -> str:
    try:
        return _struct_index()[name]
    except KeyError:
        raise KeyError(f"dspark_kernels.nvrtc: no struct {name} in the device headers") from None


def _enum_names() -> set[str]:
    return set(re.findall(r"\benum\s+(\w+)\s*:", _all_text()))


@functools.cache
def struct(name: str) -> type[ctypes.Structure]:
    """The ctypes mirror of ``struct name`` (namespace path below ``dspark``: ``"vb.Params"``) of the device headers (data members in order;
    member functions skipped; pointers as ``c_void_p``; enums with a fixed ``int32_t``
    base as ``c_int32``; arrays with a launch.h constant or a literal as their length)."""
    body = _struct_body(name)
    body = re.sub(r"\{[^{}]*\}", ";", body)  # member function bodies (one level)
    body = re.sub(r"\{[^{}]*\}", ";", body)
    enums = _enum_names()
    consts = {k.split(".")[-1]: v for k, v in constants().items()}
    fields = []
    for decl in body.split(";"):
        decl = " ".join(decl.split())
        if not decl or "(" in decl or decl.startswith(("typedef", "static", "using", "template")):
            continue
        decl = re.sub(r"\b(const|volatile|__restrict__|mutable)\b", " ", decl)
        decl = " ".join(decl.split())
        m = re.match(r"((?:unsigned |signed )?(?:long long|\w+(?:::\w+)*))\s*(.*)$", decl)
        if m is None:
            raise ValueError(f"struct {name}: cannot parse {decl!r}")
        base, rest = m.group(1), m.group(2)
        for d in rest.split(","):
            d = d.strip()
            dm = re.match(r"(\**)\s*(\w+)\s*(?:\[\s*(\w+)\s*\])?$", d)
            if dm is None:
                raise ValueError(f"struct {name}: cannot parse declarator {d!r} of {decl!r}")
            stars, field, length = dm.groups()
            if stars:
                ctype = ctypes.c_void_p
            elif base in _SCALARS:
                ctype = _SCALARS[base]
            elif base in enums:
                ctype = ctypes.c_int32
            else:
                ns = name.rpartition(".")[0]
                local = f"{ns}.{base}" if ns else base
                ctype = struct(local if local in _struct_index() else base.replace("::", "."))
            if length is not None:
                ctype = ctype * (int(length) if length.isdigit() else consts[length])
            fields.append((field, ctype))
    return type(name.replace(".", "_"), (ctypes.Structure,), {"_fields_": fields})
