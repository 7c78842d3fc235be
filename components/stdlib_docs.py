"""The standard library's docstrings and signatures, the data of builtin:pydoc and builtin:pydoc-pairs.

    docs = harvest_pydoc()            # [(qualified name, docstring)], deduplicated, sorted by module
    pairs = harvest_pydoc_pairs()     # [(module, "posixpath.join(a, *p)", "Join two or more ...")]

Harvested in a child interpreter (-I -B, no display), so imports cannot print, open windows or
leak modules into this process; deterministic for a Python version. components/data.py ingests them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

from components.errors import DataError

# ---------------------------------------------------------------------------
# builtin:pydoc - harvested in a child interpreter, so imports cannot print, open windows or leak
# modules into this process
# ---------------------------------------------------------------------------

# Modules never imported: side effects on import (browser, printing, windows), test suites, and
# packages whose content depends on what is installed (setuptools replaces distutils) or that
# write caches into the standard library (lib2to3 grammar pickles).
PYDOC_SKIP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "test", "tests", "idle_test", "distutils", "lib2to3",
})


def _pydoc_skipped(modname: str) -> bool:
    # private modules (_io, __main__, __phello__ which prints) and test packages are skipped
    parts = modname.split(".")
    return any(p.startswith("_") or p in PYDOC_SKIP or p.startswith("test_") for p in parts)


def _import_tree(names: list[str]) -> list[str]:
    """Import modules in sorted order, recursing into packages; returns those that imported."""
    import importlib
    import pkgutil

    found = []
    for modname in sorted(names):
        if _pydoc_skipped(modname):
            continue
        try:
            module = importlib.import_module(modname)
        except (Exception, SystemExit):  # not on this platform, optional C library missing, ...
            continue
        found.append(modname)
        if hasattr(module, "__path__"):
            found += _import_tree([f"{modname}.{m.name}" for m in pkgutil.iter_modules(module.__path__)])
    return found


def _harvest_here(modules: Optional[list[str]]) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the modules, their public classes and functions, deduplicated."""
    import inspect
    import warnings

    warnings.simplefilter("ignore")  # deprecated modules warn on import (this runs in the child only)
    tops = sorted(sys.stdlib_module_names) if modules is None else list(modules)
    docs, seen = [], set()
    for modname in _import_tree(tops):
        module = sys.modules[modname]
        items = [(modname, module.__doc__)]
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj)):
                items.append((f"{modname}.{attr}", getattr(obj, "__doc__", None)))
        for ident, doc in items:
            if not isinstance(doc, str):
                continue
            doc = inspect.cleandoc(doc).strip()
            if doc and doc not in seen:  # the same docstring re-exported elsewhere counts once
                seen.add(doc)
                docs.append((ident, doc))
    return docs


FIRST_SENTENCE = re.compile(r"(.+?[.!?])(?=\s|$)")


def first_sentence(doc: str, name: str = "") -> str:
    """The first sentence of a docstring's first paragraph, on one line ('' when there is none).

    A leading paragraph that only repeats the signature (``join(a, *p) -> str``, common in C
    modules) is skipped.
    """
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if p.strip()]
    if len(paragraphs) > 1 and name and paragraphs[0].startswith(f"{name}("):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return ""
    m = FIRST_SENTENCE.match(paragraphs[0])
    return m.group(1) if m else paragraphs[0]


def _signature(obj, drop_self: bool) -> Optional[str]:
    """'(a, *p)' or None when Python cannot tell it, or when it would print an address (not deterministic)."""
    import inspect

    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if drop_self and params and params[0].name in ("self", "cls"):
        sig = sig.replace(parameters=params[1:])
    text = str(sig)
    return None if " at 0x" in text else text


def _harvest_pairs_here(modules: Optional[list[str]]) -> list[tuple[str, str, str]]:
    """(module, 'qualified.name(signature)', first docstring sentence) of every public function and
    method defined in the modules (re-exports skipped), deduplicated on the source and on the pair."""
    import inspect
    import warnings

    warnings.simplefilter("ignore")
    tops = sorted(sys.stdlib_module_names) if modules is None else list(modules)
    pairs, seen = [], set()
    for modname in _import_tree(tops):
        module = sys.modules[modname]
        items = []   # (qualified name, short name, object, is a method)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != modname:
                continue
            if inspect.isroutine(obj):
                items.append((f"{modname}.{attr}", attr, obj, False))
            elif inspect.isclass(obj):
                for meth, raw in sorted(vars(obj).items()):
                    if not meth.startswith("_") and inspect.isroutine(raw):
                        items.append((f"{modname}.{attr}.{meth}", meth, getattr(obj, meth, raw),
                                      not isinstance(raw, staticmethod)))
        for ident, short, obj, method in items:
            doc = getattr(obj, "__doc__", None)
            sig = _signature(obj, method)
            if not isinstance(doc, str) or sig is None:
                continue
            target = first_sentence(inspect.cleandoc(doc), short)
            source = ident + sig
            if target and source not in seen:
                seen.add(source)
                pairs.append((modname, source, target))
    return pairs


HARVESTERS = {"docs": _harvest_here, "pairs": _harvest_pairs_here}   # what the child can harvest


def child_main() -> None:
    """Entry point of the child interpreter: JSON on the original stdout, everything else discarded."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # C-level writes too (readline's terminal codes, prints on import)
    os.dup2(devnull, 2)
    try:
        modules = json.loads(sys.argv[1])
        what = sys.argv[2] if len(sys.argv) > 2 else "docs"
        out.write(json.dumps({"docs": HARVESTERS[what](modules)}))
    except BaseException as e:  # report, do not print
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    out.close()


def _harvest_in_child(what: str, modules: Optional[list[str]], timeout: float, source: str) -> list:
    """Run HARVESTERS[what] in an isolated child interpreter (-I -B: no user site, no .pyc, no display)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
            "from components.stdlib_docs import child_main; child_main()")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["TERM"] = "dumb"
    try:
        proc = subprocess.run([sys.executable, "-I", "-B", "-c", code, json.dumps(modules), what],
                              stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=timeout)
        reply = json.loads(proc.stdout.decode("utf-8"))
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        raise DataError(f"{source}: harvesting docstrings failed ({type(e).__name__}: {e})") from None
    if "error" in reply:
        raise DataError(f"{source}: harvesting docstrings failed ({reply['error']})")
    return reply["docs"]


def harvest_pydoc(modules: Optional[list[str]] = None, timeout: float = 600) -> list[tuple[str, str]]:
    """Docstrings of the standard library (or of ``modules`` and their submodules), deduplicated.

    Returns [(qualified name, docstring)] in sorted module order; deterministic for a Python version.
    Runs in an isolated child interpreter (-I -B: no user site, no .pyc written, no display).
    """
    return [(ident, doc) for ident, doc in _harvest_in_child("docs", modules, timeout, "builtin:pydoc")]


def harvest_pydoc_pairs(modules: Optional[list[str]] = None, timeout: float = 600) -> list[tuple[str, str, str]]:
    """(module, source, target) pairs of the standard library (or of ``modules``): source is a public
    function's or method's qualified name and signature (``posixpath.join(a, *p)``), target the first
    sentence of its docstring. Sorted module order, deduplicated; deterministic for a Python version.
    Harvested in the same isolated child interpreter as builtin:pydoc."""
    return [(m, s, t) for m, s, t in _harvest_in_child("pairs", modules, timeout, "builtin:pydoc-pairs")]
