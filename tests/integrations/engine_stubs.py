"""Stub packages standing in for a serving engine that is not installed: the tests build the engine's
classes and functions under their real module names, with the signatures they pin."""
import inspect
import types


def stub_module(mods: dict, name: str, *, own: bool = False, **attrs) -> types.ModuleType:
    """A package `name` holding attrs, recorded in mods (name -> module) for the test to install in
    sys.modules. own: classes and functions among attrs say they were defined there (__module__), as
    the engine's would, for code that resolves them by module name."""
    m = types.ModuleType(name)
    m.__path__ = []  # a package, so that submodules import
    if own:
        for value in attrs.values():
            if isinstance(value, type) or inspect.isfunction(value):
                value.__module__ = name
    m.__dict__.update(attrs)
    mods[name] = m
    return m
