"""Author checkpoints: the shared fixtures read without the author's code, hostile pickles
run nothing, damaged files raise AuthorCheckpointError naming the file."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import linecache
import lzma
import os
import pickle
import random
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from ctlesion.convert.author_reader import (
    ALLOWED_GLOBALS, AuthorCheckpointError, AuthorRecord, anchor_settings, decompressed_bytes,
    read_author_checkpoint, sha256_of_file, state_dict_of,
)

REPO = Path(__file__).resolve().parents[1]
AUTHOR = Path(os.environ.get("CTLESION_SHARED_ROOT", REPO.parent / "shared")) / "fixtures" / "author"
FPN_KEY = "backbone.fpn.inner_blocks.0.weight"
SIZES, RATIOS = (2, 4, 8, 16, 32), (0.1, 0.25, 0.5, 1, 1.5, 2)

# name: (format, entries, FPN input channels, anchor levels (0: no generator), generator module, epoch)
FIXTURES = {
    "ctm-seg-r18-s3": ("legacy", 114, 256, 5, "models.mask_net.rpn_segmentation", "100"),
    "ctm-cls-r18-s3": ("legacy", 114, 256, 5, "models.mask_net.rpn", "50"),
    "ssm-2branch-r18-s3": ("legacy", 128, 256, 1, "models.ssm.rpn", "49"),
    "affinity-r18": ("zip", 186, 256, 1, "models.affinity.rpn", "100"),
    "lstm2-r18": ("zip", 212, 512, 0, None, "10"),
}


def _fixture_path(name: str) -> Path:
    path = AUTHOR / name / "author_checkpoint.pth.xz"
    if not path.is_file():
        pytest.skip(f"author fixture {path} is absent (set CTLESION_SHARED_ROOT to run this test)")
    return path


@pytest.fixture(scope="module")
def author_ckpt() -> Any:
    """Read each fixture once per module (they decompress to 25-95 MB)."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = read_author_checkpoint(_fixture_path(name))
        return cache[name]

    yield get
    cache.clear()


# ----------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_is_in_the_documented_format(name):
    fmt = FIXTURES[name][0]
    head = lzma.LZMADecompressor().decompress(_fixture_path(name).read_bytes()[:65536], max_length=4)
    assert head.startswith(b"PK\x03\x04") == (fmt == "zip")


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_weights(name, author_ckpt):
    _, entries, fpn_in, _, _, epoch = FIXTURES[name]
    ckpt = author_ckpt(name)
    weights = state_dict_of(ckpt, name)
    assert weights is ckpt["model_weights"] and len(weights) == entries
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in weights.values())
    fpn = weights[FPN_KEY]
    assert fpn.dtype == torch.float32 and fpn.shape == (256, fpn_in, 1, 1)
    # torchvision's FPN upgrades the 0.3 key names only when this metadata survives.
    assert weights._metadata["backbone.fpn"]["version"] == 1
    assert ckpt["epoch"] == epoch and ckpt["lrate"] == 1e-05


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_anchor_generator(name, author_ckpt):
    _, _, _, levels, module, _ = FIXTURES[name]
    ckpt = author_ckpt(name)
    if levels == 0:
        assert "anchor_generator" not in ckpt and anchor_settings(ckpt) is None
        return
    gen = ckpt["anchor_generator"]
    assert isinstance(gen, AuthorRecord) and gen.module == module and gen.module.startswith("models.")
    assert gen.qualname == "AnchorGenerator" and gen.args == ()
    assert gen.sizes == (SIZES,) * levels and gen.aspect_ratios == (RATIOS,) * levels
    assert anchor_settings(ckpt) == (SIZES, RATIOS)
    assert [tuple(a.shape) for a in gen.cell_anchors] == [(30, 4)] * levels
    assert list(gen._cache) == [(torch.Size([32, 32]), (16.0, 16.0))]
    assert isinstance(gen._non_persistent_buffers_set, set)  # a __builtin__.set in the file


def test_affinity_stores_its_c_star(author_ckpt):
    assert author_ckpt("affinity-r18")["affinity"] == 128


# ----------------------------------------------------------------------------- hostile pickles


class _Payload:
    """Pickles as the call ``func(*args)``: what a hostile checkpoint contains."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _payload(kind: str, marker: Path) -> _Payload:
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": lambda: _Payload(os.system, f"touch '{marker}'"),
        "eval": lambda: _Payload(builtins.eval, code),
        "exec": lambda: _Payload(builtins.exec, code),
        "subprocess": lambda: _Payload(subprocess.check_call, ["touch", str(marker)]),
    }[kind]()


def _write(path: Path, obj: Any, fmt: str) -> Path:
    """Save ``obj`` as a plain pickle, a torch zip or a legacy torch file, maybe compressed."""
    base, _, compression = fmt.partition("+")
    buf = io.BytesIO()
    if base == "pickle":
        pickle.dump(obj, buf, protocol=2)
    else:
        torch.save(obj, buf, _use_new_zipfile_serialization=(base == "zip"))
    data = buf.getvalue()
    data = {"": data, "xz": lzma.compress(data), "gz": gzip.compress(data)}[compression]
    path.write_bytes(data)
    return path


PAYLOADS = ["os.system", "eval", "exec", "subprocess"]
FORMATS = ["pickle", "pickle+xz", "zip", "zip+gz", "legacy", "legacy+xz"]


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live(tmp_path, kind):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps({"evil": _payload(kind, marker)}, protocol=2))
    assert marker.exists()  # so the tests below would notice a reader that executes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", PAYLOADS)
def test_hostile_checkpoint_runs_nothing(tmp_path, kind, fmt):
    marker = tmp_path / "pwned"
    payload = _payload(kind, marker)
    obj = {"model_weights": OrderedDict(w=torch.ones(2)), "evil": payload}
    path = _write(tmp_path / "evil.pth", obj, fmt)
    if fmt.startswith("pickle"):
        # A plain pickle is not a torch file: refused, after its globals became records.
        with pytest.raises(AuthorCheckpointError, match="not a torch checkpoint"):
            read_author_checkpoint(path)
    else:
        evil = read_author_checkpoint(path)["evil"]
        assert isinstance(evil, AuthorRecord)
        assert (evil.module, evil.qualname) == (payload.func.__module__, payload.func.__name__)
        assert evil.args == payload.args
    assert not marker.exists()


def _legacy_file(body: bytes) -> bytes:
    """A legacy torch file around a hand-written pickle ``body`` (no storages)."""
    from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

    info = {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
    head = b"".join(pickle.dumps(x, protocol=2) for x in (MAGIC_NUMBER, PROTOCOL_VERSION, info))
    return head + body + pickle.dumps([], protocol=2)


# Every way a pickle can call a global; each is the value of 'evil' in a top-level dict.
OPCODES = {
    "REDUCE": b"cos\nsystem\n(V{cmd}\ntR",
    "STACK_GLOBAL": b"Vos\nVsystem\n\x93(V{cmd}\ntR",
    "INST": b"(V{cmd}\nios\nsystem\n",
    "OBJ": b"(cos\nsystem\nV{cmd}\no",
    "NEWOBJ": b"cos\nsystem\n(V{cmd}\nt\x81",
    "NEWOBJ_EX": b"cos\nsystem\n(V{cmd}\nt}\x92",
    "REDUCE+BUILD": b"cos\nsystem\n(V{cmd}\ntR}Vx\nI1\nsb",
}


@pytest.mark.parametrize("opcode", OPCODES)
def test_every_call_opcode_gives_an_inert_record(tmp_path, opcode):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}"
    body = b"}Vevil\n" + OPCODES[opcode].replace(b"{cmd}", cmd.encode()) + b"s."
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_file(body))
    evil = read_author_checkpoint(path)["evil"]
    assert not marker.exists()
    assert isinstance(evil, AuthorRecord) and (evil.module, evil.qualname) == ("os", "system")
    assert evil.args == (cmd,) and evil.kwargs == {}
    assert evil.state == ({"x": 1} if "BUILD" in opcode else None)
    if "BUILD" in opcode:
        assert evil.x == 1


def _real(key: tuple[str, str]) -> Any:
    module, name = key
    return getattr(sys.modules[module], name)


@pytest.mark.parametrize("state", [b"}Vx\nI1\ns", b"(N}Vx\nI1\nst"], ids=["dict", "slots"])
@pytest.mark.parametrize("key", list(ALLOWED_GLOBALS), ids=".".join)
def test_build_cannot_modify_allowlisted_globals(tmp_path, key, state):
    module, name = key
    body = b"}Vf\nc" + f"{module}\n{name}\n".encode() + state + b"bs."
    path = tmp_path / "build.pth"
    path.write_bytes(_legacy_file(body))
    try:
        read_author_checkpoint(path)
    except AuthorCheckpointError:
        pass
    assert not hasattr(_real(key), "x")


def test_build_cannot_change_torch_rebuild_defaults(tmp_path):
    before = torch._utils._rebuild_tensor_v2.__defaults__
    body = b"}Vf\nctorch._utils\n_rebuild_tensor_v2\n(N}V__defaults__\n(I1\ntstbs."
    path = tmp_path / "defaults.pth"
    path.write_bytes(_legacy_file(body))
    with pytest.raises(AuthorCheckpointError, match="defaults.pth"):
        read_author_checkpoint(path)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(AuthorCheckpointError, match="TorchScript"):
        read_author_checkpoint(path)


# ----------------------------------------------------------------------------- benign files


def _benign() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    weights = OrderedDict(conv=torch.randn(8, 3, 3, 3), ids=torch.arange(5),
                          flags=torch.tensor([True, False]), half=torch.randn(3).half(),
                          base=base, view=base[:, 1:3])
    weights._metadata = OrderedDict(conv={"version": 2})
    nested = {"t": (1, 2.5, "x", None), "size": torch.Size([3, 4]), "ids": {1, 2}, "dtype": torch.float16}
    return {"model_weights": weights, "nested": nested,
            "param": torch.nn.Parameter(torch.ones(2)), "epoch": "7"}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "zip+xz", "legacy+gz"])
def test_benign_checkpoint_round_trip(tmp_path, fmt):
    obj = _benign()
    ckpt = read_author_checkpoint(_write(tmp_path / "ok.bin", obj, fmt))
    weights = state_dict_of(ckpt, "ok.bin")
    assert list(weights) == list(obj["model_weights"])
    assert all(_same_bits(weights[k], v) for k, v in obj["model_weights"].items())
    assert weights._metadata == {"conv": {"version": 2}}
    assert weights["view"].untyped_storage().data_ptr() == weights["base"].untyped_storage().data_ptr()
    assert ckpt["nested"] == obj["nested"] and type(ckpt["nested"]["size"]) is torch.Size
    assert ckpt["nested"]["dtype"] is torch.float16
    assert isinstance(ckpt["param"], torch.nn.Parameter) and ckpt["param"].requires_grad
    assert ckpt["epoch"] == "7"


AUTHOR_MODULE = '''
import pathlib
from torch import nn
pathlib.Path({marker!r}).touch()


class AnchorGenerator(nn.Module):
    def __init__(self, sizes, aspect_ratios):
        super().__init__()
        self.sizes, self.aspect_ratios = sizes, aspect_ratios
        self._cache = {{}}

    def __setstate__(self, state):
        pathlib.Path({marker!r}).touch()
        super().__setstate__(state)
'''


@pytest.fixture
def author_legacy_file(tmp_path, monkeypatch) -> Any:
    """A legacy file holding an instance of an importable ``models.*`` nn.Module, saved with
    its class source (as torch 1.1 did). Importing or unpickling the class touches a marker."""
    marker = tmp_path / "imported"
    pkg = tmp_path / "author" / "models" / "mask_net"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "rpn_segmentation.py").write_text(AUTHOR_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "author"))
    monkeypatch.chdir(tmp_path)
    try:
        from models.mask_net.rpn_segmentation import AnchorGenerator

        gen = AnchorGenerator(((2, 4), (2, 4)), ((0.5, 1.0), (0.5, 1.0)))
        path = _write(tmp_path / "author.pth", {"model_weights": OrderedDict(w=torch.ones(1)),
                                                "anchor_generator": gen}, "legacy")
        assert b"class AnchorGenerator(nn.Module)" in path.read_bytes()
        marker.unlink()
        yield path, marker, pkg / "rpn_segmentation.py"
    finally:
        for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
            del sys.modules[name]


def _read_quietly(path: Path) -> tuple[dict, list]:
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = read_author_checkpoint(path)
    assert warnings.filters == filters
    return ckpt, [str(w.message) for w in caught]


def test_legacy_module_source_is_ignored_without_importing(author_legacy_file):
    path, marker, _ = author_legacy_file
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]
    ckpt, caught = _read_quietly(path)
    assert not marker.exists() and "models" not in sys.modules
    assert caught == []
    gen = ckpt["anchor_generator"]
    assert isinstance(gen, AuthorRecord) and gen.module == "models.mask_net.rpn_segmentation"
    assert anchor_settings(ckpt) == ((2, 4), (0.5, 1.0))


def test_changed_author_source_only_warns_inside_our_call(author_legacy_file, tmp_path):
    path, marker, source = author_legacy_file  # the module stays imported: torch compares sources
    source.write_text(source.read_text().replace("self._cache = {}", "self._cache = {}  # edited"))
    linecache.clearcache()
    ckpt, caught = _read_quietly(path)
    assert caught == [] and list(tmp_path.glob("*.patch")) == []
    assert isinstance(ckpt["anchor_generator"], AuthorRecord) and not marker.exists()


# ----------------------------------------------------------------------------- damaged files


def _damaged(tmp_path: Path, kind: str) -> Path:
    """A file (or folder) that is not a readable checkpoint."""
    path = tmp_path / f"{kind}.pth"
    good = io.BytesIO()
    torch.save({"model_weights": OrderedDict(w=torch.randn(64, 64))}, good,
               _use_new_zipfile_serialization=not kind.startswith("legacy"))
    data = good.getvalue()
    content = {
        "empty": b"",
        "random": random.Random(0).randbytes(4096),
        "text": b"hello, not a checkpoint\n",
        "legacy-truncated": data[: len(data) // 2],
        "legacy-header-only": data[:40],
        "zip-truncated": data[: len(data) // 2],
        "zip-not-torch": None,
        "xz-truncated": lzma.compress(data)[:200],
        "xz-garbage": b"\xfd7zXZ\x00" + bytes(100),
        "gz-truncated": gzip.compress(data)[:100],
        "top-level-list": None,
    }
    if kind == "folder":
        path.mkdir()
    elif kind == "zip-not-torch":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "hi")
    elif kind == "top-level-list":
        torch.save([torch.ones(1)], path)
    elif kind != "missing":
        path.write_bytes(content[kind])
    return path


DAMAGED = {
    "missing": "file not found", "folder": "not a file", "empty": "empty file",
    "random": "not a torch checkpoint", "text": "not a torch checkpoint",
    "legacy-truncated": "not a torch checkpoint", "legacy-header-only": "not a torch checkpoint",
    "zip-truncated": "not a torch checkpoint", "zip-not-torch": "not a torch checkpoint",
    "xz-truncated": "truncated or corrupt xz", "xz-garbage": "truncated or corrupt xz",
    "gz-truncated": "truncated or corrupt gzip", "top-level-list": "top level is list, not a dict",
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_damaged_file_names_file_and_problem(tmp_path, kind):
    path = _damaged(tmp_path, kind)
    with pytest.raises(AuthorCheckpointError) as info:
        read_author_checkpoint(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{path}: ") and DAMAGED[kind] in str(info.value)
    # No pickle/torch traceback chained under ours.
    exc = info.value
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("key", ["state_dict", "model", None])
def test_state_dict_under_other_keys_or_bare(tmp_path, key):
    weights = OrderedDict(a=torch.ones(2), b=torch.zeros(3))
    obj = weights if key is None else {"epoch": 1, key: weights}
    ckpt = read_author_checkpoint(_write(tmp_path / "w.pth", obj, "zip"))
    assert list(state_dict_of(ckpt, "w.pth")) == ["a", "b"]


def test_state_dict_missing_names_the_keys():
    with pytest.raises(AuthorCheckpointError, match=r"x\.pth: .*'epoch', 'model'"):
        state_dict_of({"epoch": 1, "model": AuthorRecord()}, "x.pth")


def test_anchor_levels_must_agree():
    gen = {"sizes": ((2, 4), (2, 8)), "aspect_ratios": ((1.0,), (1.0,))}
    with pytest.raises(AuthorCheckpointError, match="sizes differ"):
        anchor_settings({"anchor_generator": gen})
    with pytest.raises(AuthorCheckpointError, match="aspect_ratios"):
        anchor_settings({"anchor_generator": {"sizes": ((2,),)}})


def test_sha256_is_of_the_stored_bytes(tmp_path):
    raw = pickle.dumps(list(range(1000)))
    path = tmp_path / "c.xz"
    path.write_bytes(lzma.compress(raw))
    assert sha256_of_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_of_file(path) != hashlib.sha256(raw).hexdigest()
    assert decompressed_bytes(path) == raw
    with pytest.raises(AuthorCheckpointError, match="nope"):
        sha256_of_file(tmp_path / "nope")
