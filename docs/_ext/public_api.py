"""``.. public-api:: PACKAGE``: document every name in ``PACKAGE.__all__`` with autodoc.

The API reference follows what the packages export rather than listing names by hand, so it stays
right while modules are rewritten: a name added to ``__all__`` appears, a removed one disappears.
Functions get ``autofunction``, classes ``autoclass`` with their public members, sub-modules
``automodule`` with their members, other objects (the version string) a short literal entry.
A package that cannot be imported (torch missing, for ``anomstats_torch``) gets a note instead of
an error, so the documentation builds on a machine without torch.
"""

from __future__ import annotations

import importlib
import inspect

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


class PublicAPI(SphinxDirective):
    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        package = self.arguments[0]
        try:
            mod = importlib.import_module(package)
        except ImportError as exc:
            para = nodes.paragraph(text=f"{package} could not be imported when these pages were built ({exc}).")
            return [nodes.note("", para)]
        names = list(getattr(mod, "__all__", []))
        lines: list[str] = []
        for name in names:
            obj = getattr(mod, name, None)
            target = f"{package}.{name}"
            if inspect.ismodule(obj):
                lines += [f".. automodule:: {obj.__name__}", "   :members:", ""]
            elif inspect.isclass(obj):
                lines += [f".. autoclass:: {target}", "   :members:", "   :show-inheritance:", ""]
            elif callable(obj):
                lines += [f".. autofunction:: {target}", ""]
            elif obj is not None:
                lines += [f".. py:data:: {target}", f"   :value: {obj!r}", ""]
        content = StringList(lines, source=f"<public-api {package}>")
        container = nodes.container()
        self.state.nested_parse(content, self.content_offset, container)
        return container.children


def setup(app):  # noqa: ANN001, ANN201 - Sphinx's extension protocol
    app.add_directive("public-api", PublicAPI)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
