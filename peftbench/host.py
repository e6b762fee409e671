"""The plugin host: loads plugin modules, collects methods and tasks, and isolates broken plugins.

Plugin modules come from the ``peftbench`` entry-point group (built-ins included), from ``--plugin
module:attr`` on the command line and from the config's ``plugins:`` list. A plugin that fails to import,
targets another API version, has a malformed hook implementation (pluggy validates hook and argument names
on register; peftbench adds only that a ``peftbench_*`` function without ``@hookimpl`` is refused, as pluggy
would skip it silently) or raises in a discovery hook is recorded in :attr:`Host.failed` with the reason; it
never stops the CLI or other plugins.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
import traceback
import warnings
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
#: plugin API versions loaded: the current one, and 1 through the compatibility layer of ``peftbench.plugins.lora``
COMPATIBLE_API_VERSIONS = (1, hookspecs.API_VERSION)


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
    """``plugins``: extra ``module[:attr]`` or ``path/to/file.py[:attr]`` specs (``--plugin``). With
    ``strict`` (the default, for ``run`` and ``budget``) a spec that fails raises :class:`PluginError`;
    without it (``peftbench plugins``) the failure is only recorded in :attr:`failed`, like an entry point's.
    """

    def __init__(self, plugins: list[str] | tuple[str, ...] = (), entry_points: bool = True, strict: bool = True):
        self.pm = pluggy.PluginManager("peftbench")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.failed: list[FailedPlugin] = []
        self.methods: dict[str, Registered] = {}
        self.tasks: dict[str, Registered] = {}
        if entry_points:
            self.load_entry_points()
        for spec in plugins:
            self.load_spec(spec, source="--plugin", strict=strict)

    @property
    def hook(self):
        return self.pm.hook

    # -- loading ---------------------------------------------------------------------------------------

    def load_entry_points(self) -> None:
        """Every entry point of the group: peftbench's own first, then the others by distribution name, so
        a third-party plugin that reuses a built-in name is the one refused, wherever it sits on sys.path."""
        def order(ep):
            dist = ep.dist.name if ep.dist else ""
            return (dist != "peftbench", dist, ep.name)

        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=order):
            dist = ep.dist
            info = PluginInfo(
                ep.name, "entry point", dist.name if dist else None, dist.version if dist else None
            )
            try:
                obj = ep.load()
            except (Exception, SystemExit) as exc:  # a broken third-party package must not break the CLI
                self._fail(info, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}",
                           traceback.format_exc())
                continue
            self.add_plugin(obj, info)

    def load_spec(self, spec: str, source: str, strict: bool = True) -> bool:
        """Load ``module``, ``module:attr`` or ``path/to/file.py[:attr]`` (local, unpackaged plugins).

        A module that is not importable is also looked for in the current directory (the ``peftbench``
        console script, unlike ``python -m``, does not put it on ``sys.path``). Returns success; with
        ``strict`` a failure raises :class:`PluginError`, otherwise it is recorded in :attr:`failed`.
        """
        if any(p.name == spec for p in self.plugins):
            return True
        info = PluginInfo(spec, source)
        try:
            obj = _import_spec(spec)
        except (Exception, SystemExit) as exc:
            reason = f"cannot load plugin {spec!r} ({source}): {type(exc).__name__}: {exc}"
            if strict:
                raise PluginError(reason) from exc
            return self._fail(info, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        if isinstance(obj, type) and issubclass(obj, Method):
            reason = (f"{spec!r} names the method class {obj.__name__}; name its plugin module instead "
                      f"(the module that declares PEFTBENCH_API_VERSION and implements peftbench_add_methods)")
            if strict:
                raise PluginError(f"plugin {spec!r} ({source}) refused: {reason}")
            return self._fail(info, reason)
        if self.pm.is_registered(obj):  # e.g. already loaded through its entry point
            return True
        info.package = getattr(obj, "__name__", spec.partition(":")[0])
        info.version = getattr(obj, "__version__", None)
        if not self.add_plugin(obj, info):
            if strict:
                raise PluginError(f"plugin {spec!r} ({source}) refused: {self.failed[-1].reason}")
            return False
        return True

    def add_plugin(self, obj: Any, info: PluginInfo) -> bool:
        """Register a plugin module/object and collect its methods and tasks. Returns success."""
        if info.source != "object":
            problem = api_version_problem(getattr(obj, "PEFTBENCH_API_VERSION", None), info)
            if problem:
                return self._fail(info, problem)
        try:
            self._register(obj, info.name)
        except pluggy.PluginValidationError as exc:
            return self._fail(info, f"invalid hook implementation: {_one_line(exc)}")
        except ValueError as exc:  # pluggy: a plugin of this name, or this very object, is registered already
            return self._fail(info, str(exc))
        info.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(obj) or ())
        try:
            methods = self._collect(obj, "peftbench_add_methods")
            tasks = self._collect(obj, "peftbench_add_tasks")
            for cls in methods:
                self.check_method_class(cls)
            for task in tasks:
                _check_task(task)
        except Exception as exc:
            self.pm.unregister(obj)
            return self._fail(info, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        names = [c.name for c in methods] + [t.name for t in tasks]
        clash = [c.name for c in methods if c.name in self.methods] + [t.name for t in tasks if t.name in self.tasks]
        clash += sorted({n for n in names if names.count(n) > 1})
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

    def _register(self, obj: Any, name: str) -> None:
        """Register ``obj`` with pluggy, which checks every hook implementation against its spec (a hook name
        that is no hook, arguments the hook does not pass) and raises ``PluginValidationError`` naming the
        plugin; ``obj`` is left unregistered then."""
        unmarked = [attr for attr in dir(obj) if attr.startswith("peftbench_") and callable(getattr(obj, attr, None))
                    and self.pm.parse_hookimpl_opts(obj, attr) is None]
        if unmarked:
            raise pluggy.PluginValidationError(obj, f"{', '.join(unmarked)} is not decorated with @hookimpl (from "
                                                    "peftbench.hookspecs), so it would never be called")
        self.pm.register(obj, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError:
            self.pm.unregister(obj)
            raise

    def _collect(self, plugin: Any, hook_name: str) -> list:
        """What ``plugin``'s own implementation of discovery hook ``hook_name`` returns."""
        result = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                returned = impl.function()
                if returned is not None and not isinstance(returned, (list, tuple)):
                    raise TypeError(f"{hook_name} must return a list, got {type(returned).__name__} {returned!r}")
                result += returned or []
        return result

    def check_method_class(self, cls: Any) -> None:
        """Raise ``TypeError`` naming what is wrong with method class ``cls`` (also the conformance kit's)."""
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"peftbench_add_methods returned {cls!r}, which is not a peftbench.method.Method "
                            "subclass")
        if not isinstance(getattr(cls, "name", None), str) or not cls.name:
            raise TypeError(f"method class {cls.__name__} has no `name` (a non-empty string used in configs)")
        if not dataclasses.is_dataclass(cls.Params):
            raise TypeError(f"method {cls.name!r}: `Params` must be a dataclass, got {cls.Params!r}")
        where = f"{cls.__module__}.{cls.__qualname__}"
        try:  # its run hooks are registered per run, on an instance: check them now, on the class
            self._register(cls, f"method class {where}")
        except pluggy.PluginValidationError as exc:
            raise TypeError(f"method {cls.name!r} ({where}) has invalid hook implementations: "
                            f"{_one_line(exc)}") from None
        self.pm.unregister(cls)

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

    def configure_task(self, name: str, options: dict[str, Any] | None, where: str = "") -> Task:
        """Replace task ``name`` by itself configured with ``options`` (a config's ``task_options.<name>``), so
        that every later :meth:`task` lookup sees the configured task."""
        registered = self.tasks[name] if name in self.tasks else None
        task = self.task(name).with_options(options, where)
        self.tasks[name] = dataclasses.replace(registered, obj=task)
        return task

    def _failed_hint(self) -> str:
        if not self.failed:
            return ""
        return ("\n  plugins that failed to load (see `peftbench plugins`):\n"
                + "\n".join(f"    {f.name} ({f.source}): {f.reason}" for f in self.failed))

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

    def plugin_specs(self) -> list[str]:
        """The specs that load this host's plugins again (a Ray worker, ``peftbench export`` of a stored run):
        every plugin not from an entry point (those load by themselves), in load order, file paths made
        absolute."""
        specs = []
        for info in self.plugins:
            if info.source == "entry point":
                continue
            target, colon, attr = info.name.partition(":")
            if target.endswith(".py") or "/" in target or os.sep in target:
                target = os.path.abspath(target)
            specs.append(target + colon + attr)
        return specs


def _one_line(exc: Exception) -> str:
    """Pluggy's validation message on one line, with what the author needs next: the nearest hook name for an
    unknown hook, the hook's arguments for an argument it does not pass."""
    message = " ".join(str(exc).split())
    hook = re.search(r"(?:unknown hook|for hook) '(\w+)'", message)
    if hook:
        spec = getattr(hookspecs, hook.group(1), None)
        if spec is None:
            message += suggest(hook.group(1), [h for h in dir(hookspecs) if h.startswith("peftbench_")])
        else:
            message += f"; the hook passes {hook.group(1)}({', '.join(inspect.signature(spec).parameters)}) by name"
    return message


def api_version_problem(version: Any, info: PluginInfo) -> str | None:
    """Why a plugin declaring ``version`` is refused, or ``None``; version 1 loads with a note (a warning)
    naming what to change, and runs through the compatibility layer of ``peftbench.plugins.lora``."""
    current = hookspecs.API_VERSION
    if version is None:
        return (f"declares no PEFTBENCH_API_VERSION; add `PEFTBENCH_API_VERSION = {current}` to the plugin module "
                f"(this peftbench implements hook API version {current})")
    if version not in COMPATIBLE_API_VERSIONS:
        return (f"targets peftbench hook API version {version!r}, but peftbench {_peftbench_version()} implements "
                f"version {current} (and 1 through a compatibility layer); install a release of the plugin "
                "written for this API version, or a peftbench that implements the plugin's")
    if version != current:
        warnings.warn(f"plugin {info.name!r} ({info.source}) targets peftbench API version {version} and runs "
                      "through a compatibility layer; to update it, import the LoRA toolkit from peftbench.lora "
                      f"(not peftbench.plugins.lora) and declare PEFTBENCH_API_VERSION = {current}",
                      FutureWarning, stacklevel=3)
    return None


def _peftbench_version() -> str:
    from . import __version__

    return __version__


def _import_spec(spec: str) -> Any:
    """The object named by ``module[:attr]`` or ``path/to/file.py[:attr]``."""
    target, _, attr = spec.partition(":")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
        module_name = os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(module_name)
        if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") != path:
            raise ImportError(f"a different module named {module_name!r} is already imported "
                              f"({getattr(loaded, '__file__', None)}); rename {path}")
        if loaded is None:
            file_spec = importlib.util.spec_from_file_location(module_name, path)
            loaded = importlib.util.module_from_spec(file_spec)
            sys.modules[module_name] = loaded  # before executing: dataclasses look their module up
            try:
                file_spec.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[module_name]
                raise
        obj = loaded
    else:
        importlib.invalidate_caches()  # a plugin file written moments ago must not be hidden by a stale listing
        try:
            obj = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            # only when the missing module is the plugin itself (not something it imports)
            cwd = os.getcwd()
            if exc.name != target.split(".")[0] or cwd in sys.path or "" in sys.path:
                raise
            sys.path.append(cwd)  # searched last, so it never shadows an installed package
            obj = importlib.import_module(target)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _check_task(task: Any) -> None:
    if not isinstance(task, Task):
        raise TypeError(f"peftbench_add_tasks returned {task!r}, which is not a peftbench.task.Task instance")
    if not isinstance(task.name, str) or not task.name or task.name != task.name.lower():
        raise TypeError(f"task {task.name!r}: `name` must be a non-empty lower-case string (configs lower-case "
                        "task names)")
