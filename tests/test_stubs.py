"""The checked-in stubs name exactly what the extension exports, with matching signatures."""

import ast
import inspect
import pathlib

import rotatekv._rotatekv as ext

STUB = pathlib.Path(ext.__file__).with_name("_rotatekv.pyi")


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text())


def test_every_export_has_a_stub_and_back():
    tree = _stub_tree()
    stubbed = {n.name for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
    public = {n for n in dir(ext) if not n.startswith("_")}
    private = {n for n in dir(ext) if n.startswith("_") and not n.startswith("__")}
    # Every stub names an export, every public export has a stub, and so do the private
    # entry points of the CUDA backend (wrapped by rotatekv.cuda).
    assert public | (private & stubbed) == stubbed
    assert {n for n in private if n.startswith("_cuda_")} <= stubbed


def test_method_names_and_parameters_match():
    tree = _stub_tree()
    compared = 0
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        obj = getattr(ext, cls.name)
        if issubclass(obj, BaseException):
            continue
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
            assert hasattr(obj, fn.name), f"{cls.name}.{fn.name} is not exported"
            attr = inspect.getattr_static(obj, fn.name)
            if isinstance(attr, property) or type(attr).__name__ == "getset_descriptor":
                continue
            target = obj if fn.name == "__init__" else getattr(obj, fn.name)
            try:
                sig = inspect.signature(target)
            except (TypeError, ValueError):
                continue
            want = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
            want = [a for a in want if a != "self"]
            got = [p for p in sig.parameters if p != "self"]
            assert got == want, f"{cls.name}.{fn.name}: {got} != {want}"
            compared += 1
    assert compared >= 15, compared
