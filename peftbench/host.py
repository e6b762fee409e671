"""The plugin host: loads plugin modules, collects methods and tasks, and isolates broken plugins.

Plugin modules come from the ``peftbench`` entry-point group (built-ins included), from ``--plugin
module:attr`` on the command line and from the config's ``plugins:`` list. A plugin that fails to import,
targets another API version, or raises in a discovery hook is recorded in :attr:`Host.failed` with the
reason; it never stops the CLI or other plugins.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .method import Method
from .schema import suggest
from .task import Task

ENTRY_POINT_GROUP = "peftbench"


@dataclass
class PluginInfo:
    name: str
    source: str  #: "entry point", "--plugin", "config", "object"
    package: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)


@dataclass
class FailedPlugin:
    name: str
    source: str
    reason: str
    traceback: str = ""


@dataclass
class Registered:
    """A method class or task together with the plugin that contributed it."""

    obj: Any
    plugin: PluginInfo


class Host:
    def __init__(self, plugins: list[str] | tuple[str, ...] = (), entry_points: bool = True):
        self.pm = pluggy.PluginManager("peftbench")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.failed: list[FailedPlugin] = []
        self.methods: dict[str, Registered] = {}
        self.tasks: dict[str, Registered] = {}
        if entry_points:
            self.load_entry_points()
        for spec in plugins:
            self.load_spec(spec, source="--plugin")

    @property
    def hook(self):
        return self.pm.hook

    # -- loading ---------------------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            info = PluginInfo(
                ep.name, "entry point", dist.name if dist else None, dist.version if dist else None
            )
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party package must not break the CLI
                self._fail(info, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}")
                continue
            self.add_plugin(obj, info)

    def load_spec(self, spec: str, source: str) -> None:
        """Load ``module`` or ``module:attr`` (local, unpackaged plugins)."""
        if any(p.name == spec for p in self.plugins):
            return
        module_name, _, attr = spec.partition(":")
        info = PluginInfo(spec, source)
        try:
            obj = importlib.import_module(module_name)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(f"cannot load plugin {spec!r} ({source}): {type(exc).__name__}: {exc}") from exc
        info.package = getattr(obj, "__name__", module_name)
        info.version = getattr(obj, "__version__", None)
        if not self.add_plugin(obj, info):
            failure = self.failed[-1]
            raise PluginError(f"plugin {spec!r} ({source}) refused: {failure.reason}")

    def add_plugin(self, obj: Any, info: PluginInfo) -> bool:
        """Register a plugin module/object and collect its methods and tasks. Returns success."""
        version = getattr(obj, "PEFTBENCH_API_VERSION", None)
        if info.source != "object":
            if version is None:
                return self._fail(info, "declares no PEFTBENCH_API_VERSION "
                                  f"(this peftbench implements API version {hookspecs.API_VERSION})")
            if version != hookspecs.API_VERSION:
                return self._fail(info, f"targets peftbench API version {version}, "
                                  f"this peftbench implements {hookspecs.API_VERSION}")
        try:
            self.pm.register(obj, name=info.name)
            self.pm.check_pending()
        except Exception as exc:  # pluggy validation: unknown hook, wrong argument names
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            return self._fail(info, f"invalid hook implementation: {exc}")
        info.hooks = sorted(impl_name for impl_name in dir(obj) if _is_hookimpl(obj, impl_name))
        try:
            methods = _collect(obj, "peftbench_add_methods")
            tasks = _collect(obj, "peftbench_add_tasks")
            for cls in methods:
                _check_method_class(cls)
        except Exception as exc:
            self.pm.unregister(obj)
            return self._fail(info, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        clash = [c.name for c in methods if c.name in self.methods] + [t.name for t in tasks if t.name in self.tasks]
        if clash:
            self.pm.unregister(obj)
            return self._fail(info, f"name(s) already registered by another plugin: {', '.join(clash)}")
        for cls in methods:
            self.methods[cls.name] = Registered(cls, info)
        for task in tasks:
            self.tasks[task.name] = Registered(task, info)
        self.plugins.append(info)
        return True

    def _fail(self, info: PluginInfo, reason: str, tb: str = "") -> bool:
        self.failed.append(FailedPlugin(info.name, info.source, reason, tb))
        return False

    # -- lookup ------------------------------------------------------------------------------------------

    def method(self, name: str) -> type[Method]:
        if name not in self.methods:
            raise PluginError(f"unknown method {name!r}{suggest(name, self.methods)}; "
                              f"registered: {', '.join(sorted(self.methods)) or 'none'}{self._failed_hint()}")
        return self.methods[name].obj

    def task(self, name: str) -> Task:
        if name not in self.tasks:
            raise PluginError(f"unknown task {name!r}{suggest(name, self.tasks)}; "
                              f"registered: {', '.join(sorted(self.tasks)) or 'none'}{self._failed_hint()}")
        return self.tasks[name].obj

    def _failed_hint(self) -> str:
        if not self.failed:
            return ""
        return " (plugins that failed to load: " + ", ".join(f.name for f in self.failed) + "; see `peftbench plugins`)"

    # -- per-run registration ----------------------------------------------------------------------------

    @contextmanager
    def activate(self, method: Method) -> Iterator[Method]:
        """Register ``method``'s run hooks for the duration of a ``with`` block."""
        try:
            self.pm.register(method, name=f"method:{method.name}:{id(method)}")
        except Exception as exc:
            raise PluginError(f"method {method.name!r} has an invalid hook implementation: {exc}") from exc
        try:
            yield method
        finally:
            self.pm.unregister(method)

    def implemented(self, hook_name: str) -> bool:
        """Whether any registered plugin implements run hook ``hook_name`` (checked once per run)."""
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())


def _is_hookimpl(obj: Any, name: str) -> bool:
    return name.startswith("peftbench_") and hasattr(getattr(obj, name, None), "peftbench_impl")


def _collect(plugin: Any, hook_name: str) -> list:
    function = getattr(plugin, hook_name, None)
    if function is None or not hasattr(function, "peftbench_impl"):
        return []
    return list(function() or [])


def _check_method_class(cls: Any) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"peftbench_add_methods returned {cls!r}, which is not a peftbench.method.Method subclass")
    if not getattr(cls, "name", None):
        raise TypeError(f"method class {cls.__name__} has no `name`")
