"""Read the original author's ``torch.save`` checkpoints without running anything in them.

The author's files are torch 1.1 pickles (the legacy format, sometimes the zip format),
plain or compressed with xz/gzip, holding a dict such as::

    {'epoch': '100', 'model_name': None, 'model_weights': OrderedDict(...), 'lrate': 1e-05,
     'anchor_generator': <models.mask_net.rpn_segmentation.AnchorGenerator>, ...}

They are read with ``torch.load(weights_only=False)`` and a restricted pickle module:
its ``find_class`` gives real objects only for the few globals in ``ALLOWED_GLOBALS``
(tensor rebuilding, ``OrderedDict``, ``torch.Size``, sets, dtypes). Every other global
(the author's ``models.*`` classes, ``os.system``, ``builtins.eval``...) becomes an inert
:class:`AuthorRecord` class: calling it only stores the arguments and ``__setstate__``
only stores the state, so a file can describe objects but never run code. Storage
classes (``torch.FloatStorage``...) never reach ``find_class``: torch's own unpickler
wrapper resolves them to plain dtype holders first.

TorchScript archives are refused before ``torch.load`` sees them (it would hand them to
``torch.jit.load``, which runs code stored in the archive).
"""

from __future__ import annotations

import _compat_pickle
import collections
import gzip
import hashlib
import io
import lzma
import pickle
import types
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..errors import DataError

__all__ = [
    "AuthorCheckpointError", "AuthorRecord", "ALLOWED_GLOBALS", "read_author_checkpoint",
    "decompressed_bytes", "state_dict_of", "anchor_settings", "sha256_of_file",
]

XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
STATE_DICT_KEYS = ("model_weights", "state_dict", "model")
AnchorSettings = tuple[tuple[int | float, ...], tuple[int | float, ...]]  # (sizes, aspect ratios)
_MODULE_FIELDS = ("_parameters", "_buffers", "_modules")


class AuthorCheckpointError(DataError):
    """An author checkpoint that is missing, unreadable or not shaped as expected."""


class AuthorRecord:
    """Inert stand-in for a class outside the allowlist (e.g. ``models.*.AnchorGenerator``).

    Each global gets its own subclass carrying ``module`` and ``qualname``. Instances keep
    what unpickling gave them: ``args``/``kwargs`` (from REDUCE/NEWOBJ/INST/OBJ), ``state``
    (from BUILD), ``listitems``/``dictitems`` (from APPENDS/SETITEMS). Attribute reads fall
    through to the state dict (for an ``nn.Module`` the instance ``__dict__``), then to its
    ``_parameters``/``_buffers``/``_modules``, so ``record.sizes`` works. Nothing is called.
    """

    __slots__ = ("args", "kwargs", "state", "listitems", "dictitems")
    module: ClassVar[str] = ""
    qualname: ClassVar[str] = ""
    # Read by torch's legacy source check; False means it never writes a patch file.
    dump_patches: ClassVar[bool] = False

    def __new__(cls, *args: Any, **kwargs: Any) -> AuthorRecord:
        self = super().__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.listitems: list[Any] = []
        self.dictitems: dict[Any, Any] = {}
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were stored by ``__new__``; REDUCE calls both."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.listitems.append(item)

    def extend(self, items: Any) -> None:
        self.listitems.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dictitems[key] = value

    def attributes(self) -> dict[str, Any]:
        """The instance attributes the state describes (dict state, or (dict, slots) state)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, Mapping):
                    merged.update(part)
            return merged
        return dict(state) if isinstance(state, Mapping) else {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in AuthorRecord.__slots__:
            raise AttributeError(name)
        attrs = self.attributes()
        if name in attrs:
            return attrs[name]
        for field in _MODULE_FIELDS:
            group = attrs.get(field)
            if isinstance(group, Mapping) and name in group:
                return group[name]
        raise AttributeError(f"{self.module}.{self.qualname} record has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<AuthorRecord {self.module}.{self.qualname}>"


class _FrozenCallable:
    """An allowlisted function behind a wrapper that pickle's BUILD cannot modify.

    Returning the function itself would let a file's BUILD opcode set attributes such as
    ``__defaults__`` on torch's real ``_rebuild_tensor_v2`` for the rest of the process.
    """

    __slots__ = ("_func",)

    def __init__(self, func: Callable[..., Any]) -> None:
        object.__setattr__(self, "_func", func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self._func.__qualname__} is read-only here")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self._func.__qualname__} is read-only here")

    def __repr__(self) -> str:
        return f"<allowlisted {self._func.__module__}.{self._func.__qualname__}>"


def _dtype_globals() -> dict[tuple[str, str], torch.dtype]:
    """``torch.<dtype>`` globals: dtype objects are values, not constructors."""
    dtypes = [getattr(torch, n, None) for n in (
        "float16", "float32", "float64", "bfloat16", "complex64", "complex128", "uint8",
        "int8", "int16", "int32", "int64", "bool")]
    return {("torch", str(d).removeprefix("torch.")): d for d in dtypes if isinstance(d, torch.dtype)}


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a file may resolve to real objects; see the module docstring."""
    rebuild = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
               "_rebuild_parameter_with_state")
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", name): _FrozenCallable(getattr(torch._utils, name))
        for name in rebuild if hasattr(torch._utils, name)
    }
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("torch", "Size")] = torch.Size
    allowed[("builtins", "set")] = set
    allowed[("builtins", "frozenset")] = frozenset
    allowed.update(_dtype_globals())
    return allowed


ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = types.MappingProxyType(_allowed_globals())


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Python 3 name of a global: protocol-2 pickles (torch 1.1's) write ``__builtin__.set``."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are the allowlist or inert :class:`AuthorRecord` classes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._record_classes: dict[tuple[str, str], type[AuthorRecord]] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = _python3_name(str(module), str(name))
        allowed = ALLOWED_GLOBALS.get(key)
        return allowed if allowed is not None else self._record_class(*key)

    def _record_class(self, module: str, name: str) -> type[AuthorRecord]:
        """One record class per global and per unpickler, so identities hold within a load."""
        key = (module, name)
        if key not in self._record_classes:
            namespace = {"__slots__": (), "module": module, "qualname": name,
                         "__module__": module, "__qualname__": name}
            self._record_classes[key] = type(name.rpartition(".")[2] or "Record",
                                             (AuthorRecord,), namespace)
        return self._record_classes[key]


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    """``pickle.load`` through the restricted unpickler (torch calls it for legacy headers)."""
    return _RestrictedUnpickler(file, **kwargs).load()


_PICKLE_MODULE = types.ModuleType("ctlesion_restricted_pickle")
_PICKLE_MODULE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_PICKLE_MODULE.load = _restricted_load  # type: ignore[attr-defined]


def _read_file(path: Path) -> bytes:
    """The file's bytes, or an AuthorCheckpointError saying why they cannot be read."""
    if not path.exists():
        raise AuthorCheckpointError(f"{path}: file not found")
    if not path.is_file():
        raise AuthorCheckpointError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthorCheckpointError(f"{path}: cannot be read ({exc})") from None
    if not data:
        raise AuthorCheckpointError(f"{path}: empty file")
    return data


def decompressed_bytes(path: str | Path) -> bytes:
    """The checkpoint's bytes, decompressed by magic number (xz, gzip, else as stored)."""
    path = Path(path)
    data = _read_file(path)
    try:
        if data.startswith(XZ_MAGIC):
            return lzma.decompress(data)
        if data.startswith(GZIP_MAGIC):
            return gzip.decompress(data)
    except (lzma.LZMAError, EOFError, OSError, zlib.error) as exc:
        kind = "xz" if data.startswith(XZ_MAGIC) else "gzip"
        raise AuthorCheckpointError(f"{path}: truncated or corrupt {kind} data ({exc})") from None
    return data


def _refuse_torchscript(raw: bytes, path: Path) -> None:
    """Check a zip checkpoint can be listed and is not TorchScript (``torch.jit.load`` runs code)."""
    if not raw.startswith(ZIP_MAGIC):
        return
    try:
        names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise AuthorCheckpointError(f"{path}: not a torch checkpoint (damaged zip: {exc})") from None
    if any(name.rpartition("/")[2] == "constants.pkl" for name in names):
        raise AuthorCheckpointError(f"{path}: a TorchScript archive, not a checkpoint; refused")


def _torch_load(raw: bytes, path: Path) -> Any:
    """``torch.load`` with the restricted pickle module; source-check warnings stay local."""
    with warnings.catch_warnings():
        # Legacy files may carry the source of pickled nn.Module classes; torch compares it
        # with our record class and warns. That comparison means nothing here.
        warnings.filterwarnings("ignore", category=torch.serialization.SourceChangeWarning)
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
        try:
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False,
                              pickle_module=_PICKLE_MODULE)
        except Exception as exc:  # any failure of a malformed file, pickle's or torch's
            reason = f"{type(exc).__name__}: {exc}".strip()
            raise AuthorCheckpointError(f"{path}: not a torch checkpoint ({reason[:300]})") from None


def read_author_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an author checkpoint (legacy or zip, plain/xz/gzip) into a dict; runs nothing.

    Tensors come back on the CPU; classes outside the allowlist come back as
    :class:`AuthorRecord` instances. Raises :class:`AuthorCheckpointError` for a missing,
    damaged or non-checkpoint file, or one whose top level is not a dict.
    """
    path = Path(path)
    raw = decompressed_bytes(path)
    _refuse_torchscript(raw, path)
    obj = _torch_load(raw, path)
    if not isinstance(obj, dict):
        raise AuthorCheckpointError(f"{path}: top level is {type(obj).__name__}, not a dict")
    return obj


def _is_state_dict(value: Any) -> bool:
    """A mapping of str -> Tensor."""
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _as_ordered(value: Mapping[str, torch.Tensor]) -> collections.OrderedDict[str, torch.Tensor]:
    """``value`` itself if it is an OrderedDict (keeping ``_metadata``), else a copy as one."""
    if isinstance(value, collections.OrderedDict):
        return value
    ordered = collections.OrderedDict(value)
    metadata = getattr(value, "_metadata", None)
    if metadata is not None:
        ordered._metadata = metadata  # type: ignore[attr-defined]
    return ordered


def state_dict_of(ckpt: Mapping[str, Any], path: str | Path) -> collections.OrderedDict[str, torch.Tensor]:
    """The weights of a checkpoint: ``model_weights``, ``state_dict`` or ``model``, or the
    checkpoint itself when it is a bare state dict. ``path`` is only for the error message."""
    for key in STATE_DICT_KEYS:
        if key in ckpt and _is_state_dict(ckpt[key]):
            return _as_ordered(ckpt[key])
    if ckpt and _is_state_dict(ckpt):
        return _as_ordered(ckpt)
    keys = ", ".join(repr(k) for k in list(ckpt)[:20]) or "none"
    raise AuthorCheckpointError(f"{path}: no state dict of tensors found (keys: {keys})")


def _anchor_levels(generator: Any, name: str) -> tuple[tuple[int | float, ...], ...]:
    """``generator.<name>`` as a non-empty tuple of non-empty tuples of numbers."""
    value = generator.get(name) if isinstance(generator, Mapping) else getattr(generator, name, None)
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(
        isinstance(level, (tuple, list)) and len(level) > 0 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in level)
        for level in value)
    if not ok:
        raise AuthorCheckpointError(f"anchor_generator has no usable {name!r} (got {value!r})")
    return tuple(tuple(level) for level in value)


def anchor_settings(ckpt: Mapping[str, Any]) -> AnchorSettings | None:
    """``(sizes, aspect_ratios)`` of the first level of ``ckpt['anchor_generator']``, or None
    when there is none. Every level must be identical (the converter builds one level)."""
    generator = ckpt.get("anchor_generator")
    if generator is None:
        return None
    sizes, ratios = _anchor_levels(generator, "sizes"), _anchor_levels(generator, "aspect_ratios")
    for name, levels in (("sizes", sizes), ("aspect_ratios", ratios)):
        if any(level != levels[0] for level in levels):
            raise AuthorCheckpointError(f"anchor_generator {name} differ between levels: {levels}")
    return sizes[0], ratios[0]


def sha256_of_file(path: str | Path) -> str:
    """SHA-256 (hex) of the file exactly as stored, compressed bytes included."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise AuthorCheckpointError(f"{path}: cannot be read ({exc})") from None
    return digest.hexdigest()
