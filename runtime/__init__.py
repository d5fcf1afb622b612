"""Runtimes that execute compiled femtocc programs (reference runtime and cycle simulator)."""

import os


def extension(name: str, variable: str):
    """The compiled extension ``femtocc.runtime.<name>``; the environment variable ``variable`` may
    name another build of it (the sanitizer builds that CI runs the tests of the C code under)."""
    import importlib

    override = os.environ.get(variable)
    if not override:
        return importlib.import_module(f"femtocc.runtime.{name}")
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader(f"femtocc.runtime.{name}", override)
    spec = importlib.util.spec_from_file_location(f"femtocc.runtime.{name}", override, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
