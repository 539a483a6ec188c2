"""A learner file checked before it is unpickled: loading a pickle can run any code it names.

`learn.export` writes a torch zip holding a pickle, and unpickling it calls whatever that
pickle imports: `os.system` as readily as `torch.nn.Conv2d`. So a file is read twice:

1. Without running anything (`pickletools`), the imports it would make are listed
   (`pickle_imports`) and checked against what a fastai learner is made of (`refused`):
   fastai, fastcore, torch, torchvision, timm, numpy, this package, a few named builtins.
2. It is then unpickled by `CheckedUnpickler`, which hands out only those names and checks
   what the import list cannot show: an attribute fetched with `getattr`, a module imported
   by name, and the code of a function cloudpickle saved by value (fastai 2.8 saves one for
   `RGBImage.create`), which must be the installed library's own code.

A check, not a sandbox: it refuses every file that would import anything else, and the
functions of those packages that read, write or fetch files, start processes or unpickle.
Standard library only.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
import pickletools
import types
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any, cast

TRUST_HINT = ("load only files you trust; if you trust this one, pass --trust-learner "
              "(trust=True in Python)")
PACKAGES = ("fastai", "fastcore", "fasttransform", "plum", "torch", "torchvision", "timm",
            "numpy", "gradcam_tut", "collections", "functools", "typing")
NAMES = {  # single names outside those packages, each harmless to import and to call
    *(f"builtins.{n}" for n in ("bool", "bytearray", "bytes", "complex", "dict", "float",
                                "frozenset", "int", "list", "object", "print", "range", "set",
                                "slice", "str", "tuple", "getattr")),
    "_codecs.encode", "_operator.or_", "functools.reduce", "copyreg._reconstructor",
    "copyreg.__newobj__",
    "inspect.Parameter", "inspect.Signature", "inspect._ParameterKind", "inspect._empty",
    "random.Random", "PIL.Image.Image", "PIL.Image.Resampling",
    *(f"pathlib.{n}" for n in ("Path", "PosixPath", "WindowsPath", "PurePath",
                               "PurePosixPath", "PureWindowsPath")),
    *(f"cloudpickle.cloudpickle.{n}" for n in ("subimport", "_builtin_type", "_make_function",
                                               "_function_setstate", "_make_cell",
                                               "_make_empty_cell")),
}
DENIED = (  # in those packages: files read or written, downloads, processes, code, pickles
    "torch.load", "torch.save", "torch.from_file", "torch.hub", "torch.serialization",
    "torch.utils.cpp_extension", "torch.utils.model_zoo", "torch.utils.tensorboard",
    "torch.utils.collect_env", "torch.utils.bottleneck", "torch.utils.benchmark", "torch.jit",
    "torch.package", "torch.distributed", "torch.multiprocessing", "torch.ops", "torch._ops",
    "torch.library", "torch.fx", "torch.export", "torch._export", "torch.onnx", "torch.compiler",
    "torch._dynamo", "torch._inductor", "torch.profiler", "torch.autograd.profiler",
    "torch.testing", "torch.cuda.memory", "torch._logging",
    "torchvision.io", "torchvision.datasets", "torchvision.utils.save_image",
    "torchvision.models._api", "timm.models._hub", "timm.models._helpers",
    "timm.models._builder",
    "numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
    "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.fromregex", "numpy.memmap",
    "numpy.lib", "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib",
    "numpy.rec", "numpy.DataSource",
    "fastcore.xtras", "fastcore.net", "fastcore.script", "fastcore.parallel",
    "fastcore.shutil", "fastcore.nbio", "fastcore.funccall", "fastcore.tools", "fastcore.xdg",
    "fastcore.basics.exec_local", "fastcore.basics.exec_eval", "fastcore.basics.exec_new",
    "fastai.data.external", "fastai.learner.load_learner",
    "fastai.learner.load_model", "fastai.learner.save_model", "fastai.distributed",
    "fastai.launch", "fastai.callback.tensorboard", "fastai.callback.wandb",
    "fastai.callback.neptune", "fastai.callback.azureml", "fastai.callback.comet",
    "fastai.callback.captum", "fastai.vision.gan", "fastai.collab",
    "gradcam_tut.tool.results", "gradcam_tut.tool.runner", "gradcam_tut.tool.cli",
    "gradcam_tut.tool.mini_fish", "gradcam_tut.tool.explaining", "gradcam_tut.tool.auditing",
    "gradcam_tut.tool.settings", "gradcam_tut.tool.train", "gradcam_tut.tool.pickle_check",
    "gradcam_tut.plot", "gradcam_tut.tool.shortcut",
    "functools.singledispatch",
)
MOVED = {  # names pickled by learners exported before they moved, and where they live now
    "gradcam_tut.data.RGBImage": "gradcam_tut.images.RGBImage",
    "gradcam_tut.data.load_rgb": "gradcam_tut.images.load_rgb",
}
# modules a function pickled by value reaches by name (cloudpickle's subimport)
MODULES_BY_NAME = {"io", "os", "sys", "math", "re", "warnings", "PIL.Image"}
FUNCTION_STATE = {"__name__", "__qualname__", "__annotations__", "__kwdefaults__",
                  "__defaults__", "__module__", "__doc__", "__closure__", "__globals__",
                  "_cloudpickle_submodules", "__type_params__"}
STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
           "SHORT_BINUNICODE", "BINUNICODE8"}
_MARK = object()


class UntrustedFile(ValueError):
    """A file that would import or run what a learner is not made of."""


def _normal(module: str, name: str) -> str:
    """`module.name` as Python 3 reads it (`__builtin__.long` is `builtins.int`), and where
    it lives now when it moved (`MOVED`)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    qualified = f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
    return MOVED.get(qualified, qualified)


def _under(qualified: str, prefixes) -> bool:
    return any(qualified == p or qualified.startswith(p + ".") for p in prefixes)


def allowed(qualified: str) -> bool:
    """Whether a learner may import `qualified` ("module.name", Python 3 names)."""
    if qualified in NAMES:
        return True
    return _under(qualified, PACKAGES) and not _under(qualified, DENIED)


def _imports(data: IO[bytes]) -> Iterator[str]:
    """The imports of the pickle at `data`'s position, read without running it.

    The stack is followed only far enough to know the strings a STACK_GLOBAL takes; an
    import whose name is not a constant is named "an import computed while loading".
    """
    stack: list[Any] = []  # a constant string, _MARK, or None for anything else
    memo: dict[Any, Any] = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            yield _normal(*cast(str, arg).split(" ", 1))
        elif name == "STACK_GLOBAL":
            module, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
            if isinstance(module, str) and isinstance(attr, str):
                yield _normal(module, attr)
            else:
                yield "an import computed while loading"
        elif name.startswith("EXT"):
            yield f"extension code {arg} (copyreg)"
        if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else None
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
            continue
        if pickletools.markobject in op.stack_before:  # pops everything down to the mark
            while stack and stack.pop() is not _MARK:
                pass
            del stack[len(stack) - op.stack_before.index(pickletools.markobject):]
        else:
            del stack[len(stack) - len(op.stack_before):]
        pushed = [_MARK if s is pickletools.markobject else None for s in op.stack_after]
        if name in STRINGS:
            pushed = [arg]
        stack.extend(pushed)


def pickle_imports(path: str | Path) -> list[str]:
    """Every import a torch or pickle file would make when loaded, in order, each once.

    A torch zip's pickles (`*.pkl`) are read; any other file is read as the pickles it
    starts with (a plain pickle, or torch's legacy format).

    Raises:
        UntrustedFile: the file cannot be read as a pickle (nor a torch zip of pickles).
    """
    path = Path(path)
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    if member.endswith(".pkl"):
                        found += _imports(io.BytesIO(z.read(member)))
        else:
            with path.open("rb") as f:
                found += _imports(f)  # the first pickle: a plain one fails here
                while True:  # torch's legacy format: more pickles, then raw tensor bytes
                    try:
                        found += _imports(f)
                    except ValueError:
                        break
    except (ValueError, zipfile.BadZipFile, IndexError, EOFError) as exc:
        raise UntrustedFile(f"{path} cannot be read as a pickle ({exc}): pass a learner "
                            "saved by learn.export") from exc
    return list(dict.fromkeys(found))


def check_learner_file(path: str | Path) -> None:
    """Refuse a learner file whose pickle would import anything a learner is not made of,
    before anything in it runs.

    Raises:
        UntrustedFile: naming what it would import, and how to load it anyway.
    """
    refused = [i for i in pickle_imports(path) if not allowed(i)]
    if refused:
        shown = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if refused[5:] else "")
        raise UntrustedFile(f"{path} would run {shown} when loaded, which a learner saved by "
                            f"learn.export does not: {TRUST_HINT}")


def _origin(obj) -> str | None:
    """Where a class or function was defined, "module.qualname"; None when it does not say."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else None


def _check_object(obj, how: str) -> None:
    """Refuse a module, or a callable defined outside what a learner may use."""
    if isinstance(obj, types.ModuleType):
        raise UntrustedFile(f"the file reaches the module {obj.__name__} through {how}: "
                            f"{TRUST_HINT}")
    if callable(obj):
        origin = _origin(obj)
        if origin is None or not allowed(origin):
            raise UntrustedFile(f"the file would run {origin or obj!r} (through {how}), which "
                                f"a learner does not: {TRUST_HINT}")


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    """Whether two code objects hold the same instructions, names and constants."""
    if (a.co_code, a.co_names, a.co_varnames, a.co_freevars, a.co_argcount) != \
            (b.co_code, b.co_names, b.co_varnames, b.co_freevars, b.co_argcount):
        return False
    if len(a.co_consts) != len(b.co_consts):
        return False
    return all(_same_code(x, y) if isinstance(x, types.CodeType) else
               type(x) is type(y) and x == y for x, y in zip(a.co_consts, b.co_consts))


def _installed_codes(module: types.ModuleType) -> Iterator[types.CodeType]:
    """The code of every function of `module`, and of its classes' methods."""
    def functions(namespace: Mapping[str, Any]) -> Iterator[types.CodeType]:
        for value in namespace.values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            if isinstance(value, types.FunctionType):
                yield value.__code__
            elif isinstance(value, type) and value.__module__ == module.__name__:
                yield from functions(vars(value))
    yield from functions(vars(module))


class _ModuleByName:
    """A module cloudpickle imports by name, imported only into a checked function's
    globals (anywhere else it stays this inert stand-in)."""

    def __init__(self, name: str):
        self.name = name


class MovedNamesUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that finds a name where it lives now when it has moved (`MOVED`):
    a learner exported before then still loads. It checks nothing: for files you trust."""

    def find_class(self, module: str, name: str):
        module, _, name = MOVED.get(f"{module}.{name}", f"{module}.{name}").rpartition(".")
        return super().find_class(module, name)


class CheckedUnpickler(MovedNamesUnpickler):
    """`pickle.Unpickler` that hands out only what a learner is made of (`allowed`), and
    checks `getattr`, cloudpickle's modules by name and its functions saved by value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._checks = {"builtins.getattr": self._getattr,
                        "cloudpickle.cloudpickle.subimport": self._subimport,
                        "cloudpickle.cloudpickle._builtin_type": self._builtin_type,
                        "cloudpickle.cloudpickle._make_function": self._make_function,
                        "cloudpickle.cloudpickle._function_setstate": self._function_setstate}
        self._real = {}  # the functions behind those checks, once imported
        self._checked = set()  # ids of the functions `_make_function` checked

    def find_class(self, module: str, name: str):
        qualified = _normal(module, name)
        if "." in name or not allowed(qualified):
            raise UntrustedFile(f"the file would run {qualified} when loaded, which a learner "
                                f"does not: {TRUST_HINT}")
        obj = super().find_class(module, name)
        if qualified in self._checks:
            self._real[qualified] = obj
            return self._checks[qualified]
        if qualified not in NAMES:  # a name re-exported from elsewhere (fastai.imports.os)
            _check_object(obj, f"the name {qualified}")
        return obj

    def _getattr(self, obj, name: str, *default):
        if not isinstance(obj, type) or not isinstance(name, str) or name.startswith("__"):
            raise UntrustedFile(f"the file would fetch {name!r} from {obj!r} while loading, "
                                f"which a learner does not: {TRUST_HINT}")
        found = getattr(obj, name, *default)
        _check_object(found, f"getattr({obj.__name__}, {name!r})")
        return found

    def _subimport(self, name: str) -> _ModuleByName:
        if not (name in MODULES_BY_NAME or allowed(f"{name}.")):
            raise UntrustedFile(f"the file would import the module {name} while loading, "
                                f"which a learner does not: {TRUST_HINT}")
        return _ModuleByName(name)

    def _builtin_type(self, name: str):
        if name not in ("CodeType", "MethodType"):  # data, and a checked function bound
            raise UntrustedFile(f"the file would make a {name} while loading: {TRUST_HINT}")
        return getattr(types, name)

    def _make_function(self, code, base_globals, name, argdefs, closure):
        module = base_globals.get("__name__") if isinstance(base_globals, dict) else None
        installed = ()
        if isinstance(module, str) and allowed(f"{module}.{name}"):
            try:
                installed = _installed_codes(importlib.import_module(module))
            except ImportError:  # a module that moved (`MOVED`): no installed code to match
                pass
        if not isinstance(code, types.CodeType) or \
                not any(_same_code(code, c) for c in installed):
            shown = getattr(code, "co_qualname", name)
            raise UntrustedFile(f"the file carries code of its own ({shown} for {module}), not "
                                f"the installed library's, which it would run: {TRUST_HINT}")
        func = self._real["cloudpickle.cloudpickle._make_function"](
            code, base_globals, name, argdefs, closure)
        self._checked.add(id(func))
        return func

    def _function_setstate(self, obj, state):
        state, slotstate = state
        if id(obj) not in self._checked or set(state) or \
                not set(slotstate) <= FUNCTION_STATE:
            raise UntrustedFile(f"the file would change the function {obj!r} while loading: "
                                f"{TRUST_HINT}")
        names = slotstate.get("__globals__", {})
        for key, value in list(names.items()):
            if isinstance(value, _ModuleByName):
                names[key] = importlib.import_module(value.name)
            else:
                _check_object(value, f"the globals of {obj.__qualname__}")
        slotstate["_cloudpickle_submodules"] = []
        self._real["cloudpickle.cloudpickle._function_setstate"](obj, (state, slotstate))


def load(file, **kwargs):
    """`pickle.load` through `CheckedUnpickler`."""
    return CheckedUnpickler(file, **kwargs).load()


checked_pickle = types.SimpleNamespace(__name__=__name__, load=load,
                                       Unpickler=CheckedUnpickler, Pickler=pickle.Pickler,
                                       dump=pickle.dump)
"""What `torch.load(..., pickle_module=)` (and fastai's `load_learner`) unpickles with."""

trusted_pickle = types.SimpleNamespace(
    __name__=__name__, load=lambda file, **kwargs: MovedNamesUnpickler(file, **kwargs).load(),
    Unpickler=MovedNamesUnpickler, Pickler=pickle.Pickler, dump=pickle.dump)
"""The same for a file you trust: nothing checked, moved names found (`MOVED`)."""
