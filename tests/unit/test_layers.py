"""The layers import one way (docs/architecture.md, "Layers").

Read from the source with ``ast``, imports inside functions included, so a
forbidden import fails here before anyone follows a request backwards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import deltagw

PACKAGE = Path(deltagw.__file__).parent

SHARED = ("deltagw.config", "deltagw.routes", "deltagw.errors", "deltagw.logs",
          "deltagw.metrics", "deltagw.metric_series", "deltagw.http_syntax")
"""The foundations every layer stands on: they import no layer."""

LAYERS = ("deltagw.web", "deltagw.upstream", "deltagw.policy", "deltagw.process",
          "deltagw.cache")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The upstream side returns what happened; it never reaches back.
    "deltagw.upstream": ("deltagw.web", "deltagw.policy", "deltagw.process",
                         "deltagw.service", "deltagw.tap"),
    "deltagw.policy": ("deltagw.web", "deltagw.process", "deltagw.service", "deltagw.tap"),
    "deltagw.process": ("deltagw.web", "deltagw.policy", "deltagw.service", "deltagw.tap"),
    "deltagw.web": ("deltagw.process", "deltagw.service", "deltagw.tap"),
    "deltagw.speedups": ("deltagw.web", "deltagw.upstream", "deltagw.policy", "deltagw.process",
                         "deltagw.cache", "deltagw.service", "deltagw.tap"),
    # The cache's core is decisions on plain data: the web layer will call
    # it, and it calls nothing back.
    "deltagw.cache": ("deltagw.web", "deltagw.upstream", "deltagw.policy", "deltagw.process",
                      "deltagw.speedups", "deltagw.demo", "deltagw.service", "deltagw.tap"),
    **{shared: LAYERS + ("deltagw.service", "deltagw.tap") for shared in SHARED},
}
"""Prefixes a module under the key may not import."""

ONLY_ALLOWED: dict[str, tuple[str, ...]] = {
    # The route table is data: everything reads it, it reads nothing of ours.
    "deltagw.routes": (),
    # The demo platform stands in for real services: it may share the
    # gateway's log format, nothing of how the gateway works.
    "deltagw.demo": ("deltagw.demo", "deltagw.logs"),
}
"""Prefixes that are all a module under the key may import of deltagw."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every ``deltagw`` module ``source`` imports, relative imports resolved."""
    found: set[str] = set()
    package = name if is_package else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "deltagw" or m.startswith("deltagw.")}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(name: str, imported: set[str]) -> list[str]:
    """The imports of module ``name`` that break the layer rules."""
    bad = []
    for owner, forbidden in FORBIDDEN.items():
        if _under(name, owner):
            bad += [m for m in imported if any(_under(m, f) for f in forbidden)]
    for owner, allowed in ONLY_ALLOWED.items():
        if _under(name, owner):
            bad += [
                m for m in imported
                if m != "deltagw" and not any(_under(m, a) for a in allowed)
            ]
    return sorted(set(bad))


def test_the_rules_catch_a_forbidden_import() -> None:
    """The checker itself: each kind of rule finds the import it forbids."""
    assert violations("deltagw.upstream.proxy", {"deltagw.web.site"}) == ["deltagw.web.site"]
    assert violations("deltagw.policy.buckets", {"deltagw.web"}) == ["deltagw.web"]
    assert violations("deltagw.routes", {"deltagw.errors"}) == ["deltagw.errors"]
    assert violations("deltagw.demo.auth", {"deltagw.policy.token_verifiers"}) == [
        "deltagw.policy.token_verifiers"
    ]
    assert violations("deltagw.demo.auth", {"deltagw.logs", "deltagw.demo.market"}) == []
    assert violations("deltagw.web.site", {"deltagw.upstream.proxy"}) == []
    assert violations("deltagw.cache.store", {"deltagw.upstream.proxy"}) == [
        "deltagw.upstream.proxy"
    ]
    assert violations("deltagw.cache.store", {"deltagw.http_syntax", "deltagw.cache.keys"}) == []
    assert violations("deltagw.metrics", {"deltagw.cache.status"}) == ["deltagw.cache.status"]
    source = "def f():\n    from ..web import site\n"
    assert imported_modules(source, "deltagw.upstream.proxy") >= {"deltagw.web.site"}
    assert imported_modules("from .web import site", "deltagw", is_package=True) >= {
        "deltagw.web.site"
    }


def test_every_module_imports_only_what_its_layer_may() -> None:
    """web may use policy and upstream; upstream and policy never reach back to web;
    the route table and the shared foundations import no layer; the cache imports only
    the foundations; the demo only logs."""
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 40, "the package was not found where expected"
    broken = {
        module_name(path): bad
        for path in modules
        if (bad := violations(module_name(path), imported_modules(
            path.read_text(), module_name(path), is_package=path.name == "__init__.py"
        )))
    }
    assert broken == {}


def test_every_error_answer_is_defined_in_errors() -> None:
    """The answers the gateway gives itself have one home, so the error table is one file."""
    import importlib
    import pkgutil

    from deltagw.errors import GatewayError

    for module in pkgutil.walk_packages([str(PACKAGE)], "deltagw."):
        importlib.import_module(module.name)

    def subclasses(cls: type) -> list[type]:
        return [cls] + [c for sub in cls.__subclasses__() for c in subclasses(sub)]

    found = subclasses(GatewayError)
    assert len(found) > 10
    assert {c.__qualname__: c.__module__ for c in found if c.__module__ != "deltagw.errors"} == {}
