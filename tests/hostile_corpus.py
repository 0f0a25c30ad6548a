"""A corpus of hostile inputs, generated here, and a runner that puts each through the real CLI.

Every case is a command line (``segstudio segment|batch|eval|models ...``) on
files this module writes, with the exit codes it may end with: 2 for a bad
input (one line on stderr, ``segstudio: error: ...``, naming the file), 0 or
1 where the input is valid.  :func:`run_corpus` runs the cases one after the
other in one process (``python tests/hostile_corpus.py ROOT RESULTS.json``)
with the standard streams captured at the file-descriptor level, and records
for each: the exit code, what it printed, the seconds it took, the growth of
resident memory over the process's level before the case, every file created
or changed outside the case's output folder and the app's own folder, and
whether a marker file that a hostile model tries to create exists.
``tests/test_hostile.py`` asserts on those records; ``benchmarks/hostile.py``
runs the same corpus with larger cases.

The classes follow issue 13: files that are not what they claim, decompression
bombs, non-finite pixels, unusable metadata, option values, output locations,
damaged batch state, evaluation inputs, and hostile model files.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "0287e7ee5b00_img.tif"  # 256 x 256, 12 nuclei or so
MODEL = "nuclei-light"  # the fast built-in model: the corpus tests the plumbing, not the network
BACKEND = "onnxruntime"


@dataclass
class Case:
    name: str
    kind: str  # the class of failure (issue 13)
    argv: list[str]
    expect: tuple[int, ...] = (2,)
    names: str | None = None  # what the error line must mention (the file), default: none checked
    stderr_has: str | None = None  # text the captured stderr must hold (e.g. a warning)
    timeout: float = 60.0


@dataclass
class Result:
    name: str
    kind: str
    code: int | None
    seconds: float
    stdout: str
    stderr: str
    rss_growth_mb: float
    outside_writes: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- file makers


def sample_pixels() -> np.ndarray:
    import tifffile

    return tifffile.imread(SAMPLE)


def png_bomb(path: Path, width: int, height: int) -> None:
    """A valid PNG header declaring ``width`` x ``height`` 1-bit pixels, with a few rows of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + width // 8) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def sparse_tiff_bomb(path: Path, height: int, width: int, tile: int = 1024) -> None:
    """A classic TIFF of ``height`` x ``width`` uint8 pixels whose tiles all point at one compressed tile.

    200,000 x 200,000 (40 gigapixels) takes about 0.3 MB: each tile costs
    8 bytes of offsets and byte counts.
    """
    across, down = -(-width // tile), -(-height // tile)
    n = across * down
    payload = zlib.compress(bytes(tile * tile), 9)
    header = 8
    data_at = header
    offsets_at = data_at + len(payload)
    counts_at = offsets_at + 4 * n
    ifd_at = counts_at + 4 * n
    tags = [  # (tag, type, count, value or offset); types: 3 SHORT, 4 LONG
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
        (277, 3, 1, 1), (284, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile),
        (324, 4, n, offsets_at), (325, 4, n, counts_at),
    ]
    ifd = struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        packed = struct.pack("<HHI", tag, typ, count)
        ifd += packed + (struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    with open(path, "wb") as f:
        f.write(b"II*\x00" + struct.pack("<I", ifd_at))
        f.write(payload)
        f.write(struct.pack(f"<{n}I", *([data_at] * n)))
        f.write(struct.pack(f"<{n}I", *([len(payload)] * n)))
        f.write(ifd)


def ome_tiff(path: Path, pixels: np.ndarray, size_x: str, size_y: str) -> None:
    """An OME-TIFF whose OME-XML states the given physical pixel sizes verbatim."""
    import tifffile

    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           f'<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="{pixels.shape[1]}" '
           f'SizeY="{pixels.shape[0]}" SizeC="1" SizeZ="1" SizeT="1" PhysicalSizeX="{size_x}" '
           f'PhysicalSizeY="{size_y}"><Channel ID="Channel:0" SamplesPerPixel="1"/>'
           '<TiffData/></Pixels></Image></OME>')
    tifffile.imwrite(path, pixels.astype(np.uint16), description=xml, metadata=None)


def onnx_bytes(kind: str, folder: Path) -> Path:
    """Hostile ONNX files: ``garbage``, ``custom_op``, ``external_outside``, ``huge_initializer``, ``endless_loop``."""
    path = folder / f"{kind}.onnx"
    if kind == "garbage":
        path.write_bytes(b"\x08\x07" + os.urandom(4000))
        return path
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 1, "h", "w"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", 2, "h", "w"])
    opset = [helper.make_opsetid("", 17)]
    if kind == "custom_op":
        opset.append(helper.make_opsetid("evil.domain", 1))
        node = helper.make_node("Pwn", ["input"], ["output"], domain="evil.domain")
        graph = helper.make_graph([node], "g", [x], [y])
    elif kind in ("external_outside", "huge_initializer"):
        outside = kind == "external_outside"
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 1, 1, 1] if outside else [2**16, 2**15, 1, 1])
        w.data_location = TensorProto.EXTERNAL
        location, length = ("../../secret.bin", 8) if outside else ("weights.bin", 2**33)
        for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        if not outside:
            (folder / "weights.bin").write_bytes(b"\0" * 1024)
        node = helper.make_node("Conv", ["input", "w"], ["output"])
        graph = helper.make_graph([node], "g", [x], [y], initializer=[w])
    elif kind == "endless_loop":
        # Loop with no trip count and a condition that stays true: runs until killed
        cond_in = helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])
        it = helper.make_tensor_value_info("iter", TensorProto.INT64, [])
        cond_out = helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])
        body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body", [it, cond_in],
                                 [cond_out])
        true = helper.make_tensor("true", TensorProto.BOOL, [], vals=[True])
        nodes = [helper.make_node("Loop", ["", "true"], [], body=body),
                 helper.make_node("Concat", ["input", "input"], ["output"], axis=1)]
        graph = helper.make_graph(nodes, "g", [x], [y], initializer=[true])
    else:
        raise ValueError(kind)
    model = helper.make_model(graph, opset_imports=opset)
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def torchscript_trap(folder: Path, target: Path, where: str) -> Path:
    """A TorchScript archive that maps ``target`` with ``torch.from_file(shared=True)`` in ``where``
    (``__setstate__``: when it is loaded, or ``forward``: when it runs) and writes to it: running it creates
    ``target``."""
    import torch

    path = folder / f"trap_{where}.pt"
    name = str(target)

    class Base(torch.nn.Module):
        __constants__ = ["target"]

        def __init__(self):
            super().__init__()
            self.target = name
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

    class OnLoad(Base):
        def forward(self, x):
            return self.conv(x)

        @torch.jit.export
        def __getstate__(self):
            return (self.training,)

        @torch.jit.export
        def __setstate__(self, state: tuple[bool]):
            mapped = torch.from_file(self.target, shared=True, size=16, dtype=torch.uint8)
            mapped.fill_(1)
            self.training = state[0] and bool(mapped.sum() >= 0)  # used, so never optimized away

    class OnRun(Base):
        def forward(self, x):
            mapped = torch.from_file(self.target, shared=True, size=16, dtype=torch.uint8)
            mapped.fill_(1)
            return self.conv(x) + mapped[0].to(x.dtype) * 0.0

    Trap = OnLoad if where == "__setstate__" else OnRun
    torch.jit.script(Trap()).save(str(path))
    return path


def bioimageio_package(folder: Path, name: str, rdf: dict, files: dict[str, bytes] | None = None,
                       zipped: bool = True) -> Path:
    """A BioImage.IO package: ``rdf.yaml`` from ``rdf`` and ``files``, zipped unless ``zipped`` is False."""
    import zipfile

    import yaml

    files = {"rdf.yaml": yaml.safe_dump(rdf).encode(), **(files or {})}
    if not zipped:
        pkg = folder / name
        pkg.mkdir()
        for n, data in files.items():
            (pkg / n).write_bytes(data)
        return pkg
    path = folder / f"{name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    return path


def zip_bomb(folder: Path) -> Path:
    """A BioImage.IO-looking zip whose one member inflates to 2 GiB (2 MB on disk)."""
    import zipfile

    path = folder / "bomb.bioimageio.zip"
    block = bytes(2**24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("rdf.yaml", "type: model\nname: bomb\n")
        with z.open("weights.onnx", "w", force_zip64=True) as f:
            for _ in range(128):
                f.write(block)
    return path


def _rdf(**overrides) -> dict:
    rdf = {
        "format_version": "0.5.3", "type": "model", "name": "hostile", "authors": [{"name": "tests"}],
        "inputs": [{"id": "raw", "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["c"]},
                                          {"type": "space", "id": "y", "size": {"min": 64, "step": 16}},
                                          {"type": "space", "id": "x", "size": {"min": 64, "step": 16}}]}],
        "outputs": [{"id": "out", "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["fg"]},
                                           {"type": "space", "id": "y", "halo": 16},
                                           {"type": "space", "id": "x", "halo": 16}]}],
        "weights": {"onnx": {"source": "weights.onnx"}},
    }
    for key, value in overrides.items():
        target, _, field_ = key.partition("__")
        if field_:
            rdf[target][0][field_] = value
        else:
            rdf[target] = value
    return rdf


# ----------------------------------------------------------------------------- the corpus


def make_corpus(root: Path, *, with_models: bool = True) -> list[Case]:
    """Write the corpus under ``root/in`` and return its cases (outputs go to ``root/out/<case>``)."""
    import tifffile

    d = root / "in"
    d.mkdir(parents=True, exist_ok=True)
    px = sample_pixels()
    cases: list[Case] = []
    seg = ["segment", "--model", MODEL, "--backend", BACKEND, "-q"]

    def segment(name, kind, filename, expect=(2,), stderr_has=None, extra=()):
        cases.append(Case(name, kind, [*seg, str(d / filename), "--out", "{out}", *extra], expect,
                          names=filename if expect == (2,) else None, stderr_has=stderr_has))

    # files that are not what they claim
    (d / "empty.tif").write_bytes(b"")
    segment("empty_tiff", "not an image", "empty.tif")
    tifffile.imwrite(d / "whole.tif", px)
    (d / "truncated.tif").write_bytes((d / "whole.tif").read_bytes()[:400])
    segment("truncated_tiff", "not an image", "truncated.tif")
    (d / "random.tif").write_bytes(np.random.default_rng(0).bytes(5000))
    segment("random_tiff", "not an image", "random.tif")
    (d / "random.png").write_bytes(b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(3000))
    segment("random_png", "not an image", "random.png")
    (d / "random.npy").write_bytes(np.random.default_rng(2).bytes(3000))
    segment("random_npy", "not an image", "random.npy")
    (d / "folder.tif").mkdir()
    segment("folder_named_tif", "not an image", "folder.tif")
    os.mkfifo(d / "pipe.tif")
    segment("named_pipe", "not an image (would block)", "pipe.tif")
    os.symlink("loop.tif", d / "loop.tif")
    segment("symlink_loop", "not an image", "loop.tif")
    tifffile.imwrite(d / "tiny.tif", px[:4, :4])
    segment("four_pixels", "not an image", "tiny.tif")
    np.save(d / "five_d.npy", np.zeros((2, 3, 5, 16, 16), np.uint8))
    segment("five_d_npy", "not an image", "five_d.npy")
    np.save(d / "one_d.npy", np.zeros(100, np.uint8))
    segment("one_d_npy", "not an image", "one_d.npy")
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    segment("pickled_npy", "not an image (pickle)", "objects.npy")
    np.save(d / "complex.npy", px.astype(np.complex64))
    segment("complex_npy", "not an image", "complex.npy")
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.uint16))
    header["shape"] = (100_000, 100_000)
    with open(d / "liar.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(1000))
    segment("npy_header_lies", "truncated", "liar.npy")
    tifffile.imwrite(d / "channels.tif", np.zeros((40, 32, 32), np.uint8), photometric="minisblack",
                     metadata={"axes": "CYX"})
    segment("forty_channels", "not an image", "channels.tif")

    # decompression bombs and sizes beyond the budget
    png_bomb(d / "bomb.png", 100_000, 100_000)
    segment("png_bomb", "decompression bomb", "bomb.png")
    sparse_tiff_bomb(d / "bomb40gpx.tif", 200_000, 200_000)
    segment("tiff_40_gigapixels", "decompression bomb", "bomb40gpx.tif")
    try:
        import zarr

        zarr.create_array(store=str(d / "huge.zarr"), shape=(1_000_000, 1_000_000), chunks=(1024, 1024),
                          dtype="uint16", fill_value=0)
        segment("zarr_terapixel", "decompression bomb", "huge.zarr")
        zarr.create_array(store=str(d / "bigchunk.zarr"), shape=(60_000, 60_000), chunks=(60_000, 60_000),
                          dtype="uint16", fill_value=0)
        segment("zarr_one_huge_chunk", "decompression bomb", "bigchunk.zarr")
    except ImportError:
        pass

    # valid but unusual pixels: success, and the user is told
    np.save(d / "half.npy", px.astype(np.float16))
    segment("float16_npy", "valid image", "half.npy", expect=(0,))
    np.save(d / "mask.npy", px > np.percentile(px, 80))
    segment("bool_npy", "valid image", "mask.npy", expect=(0,))
    tifffile.imwrite(d / "bigendian.tif", px.astype(">f4"), byteorder=">")
    segment("big_endian_float", "valid image", "bigendian.tif", expect=(0,))
    nan = px.astype(np.float32)
    nan[40:50, 40:50] = np.nan
    tifffile.imwrite(d / "nan_patch.tif", nan)
    segment("nan_patch", "non-finite pixels", "nan_patch.tif", expect=(0,), stderr_has="not finite")
    huge = px.astype(np.float64)
    huge[40:50, 40:50] = 1e300
    tifffile.imwrite(d / "huge_patch.tif", huge)
    segment("values_near_1e300", "non-finite pixels", "huge_patch.tif", expect=(0,), stderr_has="not finite")
    inf = px.astype(np.float32)
    inf[::7, ::5] = np.inf
    tifffile.imwrite(d / "inf_grid.tif", inf)
    segment("scattered_infinity", "non-finite pixels", "inf_grid.tif", expect=(0,), stderr_has="not finite")
    tifffile.imwrite(d / "all_nan.tif", np.full((64, 64), np.nan, np.float32))
    segment("all_nan", "non-finite pixels", "all_nan.tif", expect=(0,), stderr_has="not finite")
    for name, sx in (("negative", "-0.5"), ("nan", "NaN"), ("tiny", "1e-30"), ("text", "abc"), ("inf", "inf")):
        ome_tiff(d / f"ome_{name}.ome.tif", px, sx, sx)
        segment(f"ome_pixel_size_{name}", "unusable metadata", f"ome_{name}.ome.tif", expect=(0,),
                stderr_has="pixel size")
    segment("diameter_um_without_usable_size", "unusable metadata", "ome_negative.ome.tif",
            extra=("--diameter", "9um"))

    # option values
    for opt, value in (("--tile", "0"), ("--tile", "-64"), ("--tile", "abc"), ("--diameter", "nan"),
                       ("--diameter", "inf"), ("--diameter", "-3"), ("--diameter", "12parsecs"),
                       ("--batch-size", "0"), ("--threads", "-1"), ("--channel", "x")):
        cases.append(Case(f"option{opt}={value}", "option value",
                          [*seg, str(d / "whole.tif"), "--out", "{out}", opt, value], names=opt))
    segment("channel_out_of_range", "option value", "whole.tif", extra=("--channel", "7"))
    for value in ("percentile:5", "percentile:a,b", "percentile:60,40", "zscore", "percentile:0,101"):
        cases.append(Case(f"normalize={value}", "option value",
                          ["models", "import", str(d / "whole.tif"), "--normalize", value], names="--normalize"))
    cases.append(Case("batch_workers_0", "option value", ["batch", str(d), "--out", "{out}", "--workers", "0"],
                      names="--workers"))

    # output locations
    (d / "a_file").write_bytes(b"not a folder")
    cases.append(Case("out_is_a_file", "output location", [*seg, str(d / "whole.tif"), "--out", str(d / "a_file")],
                      names="a_file"))
    cases.append(Case("out_below_a_file", "output location",
                      [*seg, str(d / "whole.tif"), "--out", str(d / "a_file" / "sub")], names="a_file"))
    cases.append(Case("out_dev_null", "output location", [*seg, str(d / "whole.tif"), "--out", "/dev/null"],
                      names="/dev/null"))
    cases.append(Case("out_in_proc", "output location", [*seg, str(d / "whole.tif"), "--out", "/proc/segstudio"],
                      names="/proc/segstudio"))
    cases.append(Case("eval_json_is_a_folder", "output location",
                      ["eval", "--model", MODEL, "--backend", BACKEND, "--images", str(ROOT / "sample_data"),
                       "--json", str(d / "folder.tif"), "-q", "--worst", "0"], names="folder.tif"))

    # data that would be lost
    (d / "twins" / "a").mkdir(parents=True)
    (d / "twins" / "b").mkdir()
    tifffile.imwrite(d / "twins" / "a" / "img.tif", px)
    tifffile.imwrite(d / "twins" / "b" / "img.tif", px)
    cases.append(Case("two_inputs_one_output_name", "data loss",
                      [*seg, str(d / "twins" / "a" / "img.tif"), str(d / "twins" / "b" / "img.tif"), "--out", "{out}"],
                      names="img"))
    (d / "own").mkdir()
    tifffile.imwrite(d / "own" / "cells.tif", px)
    tifffile.imwrite(d / "own" / "cells_labels.tif", np.ones((8, 8), np.uint16))  # the user's ground truth
    cases.append(Case("would_replace_users_labels", "data loss",
                      [*seg, str(d / "own" / "cells.tif"), "--out", str(d / "own")], names="cells_labels.tif"))

    # batch state
    (d / "plate").mkdir()
    tifffile.imwrite(d / "plate" / "w1.tif", px)
    tifffile.imwrite(d / "plate" / "w2.tif", px[:128, :128])
    cases.append(Case("batch_out_is_in", "option value",
                      ["batch", str(d / "plate"), "--out", str(d / "plate")], names="plate"))
    cases.append(Case("batch_scheduler_not_an_address", "option value",
                      ["batch", str(d / "plate"), "--out", "{out}", "--scheduler", "notanaddress", "--model", MODEL,
                       "--backend", BACKEND, "-q"], names="notanaddress"))
    cases.append(Case("batch_damaged_manifest", "batch state",
                      ["batch", str(d / "plate"), "--out", "{out}", "--model", MODEL, "--backend", BACKEND, "-q"],
                      expect=(0,), stderr_has="damaged line"))

    # evaluation inputs
    (d / "evalshape").mkdir()
    tifffile.imwrite(d / "evalshape" / "x_img.tif", px)
    tifffile.imwrite(d / "evalshape" / "x_labels.tif", np.zeros((100, 80), np.uint16))
    cases.append(Case("eval_labels_of_another_shape", "evaluation input",
                      ["eval", "--model", MODEL, "--backend", BACKEND, "--images", str(d / "evalshape"), "-q",
                       "--worst", "0"], names="x_"))
    for name, index in (("broken_index_json", '[{"file": "y", "kind": '), ("index_json_wrong_types", '{"file": 3}')):
        folder = d / name
        folder.mkdir()
        tifffile.imwrite(folder / "y_img.tif", px)
        tifffile.imwrite(folder / "y_labels.tif", np.zeros(px.shape, np.uint16))
        (folder / "index.json").write_text(index)
        cases.append(Case(f"eval_{name}", "evaluation input",
                          ["eval", "--model", MODEL, "--backend", BACKEND, "--images", str(folder),
                           "--kind", "fluorescence", "-q"], names="index.json"))

    (d / "trainshape").mkdir()
    for stem in ("p", "q"):
        tifffile.imwrite(d / "trainshape" / f"{stem}_img.tif", px)
        tifffile.imwrite(d / "trainshape" / f"{stem}_labels.tif", np.zeros((10, 12), np.uint16))
    cases.append(Case("train_labels_of_another_shape", "evaluation input",
                      ["train", "--from", MODEL, "--images", str(d / "trainshape"), "--out", "{out}", "--steps", "2",
                       "-q"], names="_labels.tif"))
    cases.append(Case("optimize_labels_of_another_shape", "evaluation input",
                      ["optimize", "--model", MODEL, "--calib", str(d / "trainshape"), "--val-labels",
                       str(d / "trainshape"), "--steps", "quantize:int8", "--out", "{out}", "-q"],
                      names="_labels.tif"))

    if with_models:
        cases += _model_cases(root, d)
    return cases


def _model_cases(root: Path, d: Path) -> list[Case]:
    m = d / "models"
    m.mkdir()
    cases = []
    image = str(d / "whole.tif")

    def use(name, kind, model_path, names=None):
        cases.append(Case(f"model_{name}", kind, ["segment", image, "--model", str(model_path), "--backend", BACKEND,
                                                  "--out", "{out}", "-q"], names=names or Path(model_path).name))

    (m / "random.pt").write_bytes(np.random.default_rng(3).bytes(4096))
    use("random_bytes_pt", "bad model file", m / "random.pt")
    (m / "truncated.onnx").write_bytes(b"\x08\x07\x12\x04")
    use("truncated_onnx", "bad model file", m / "truncated.onnx")
    for kind in ("garbage", "custom_op", "endless_loop"):
        use(f"onnx_{kind}", "bad model file", onnx_bytes(kind, m))
    ext = m / "ext"
    ext.mkdir()
    (root / "secret.bin").write_bytes(b"secret!!")
    use("onnx_external_data_outside", "bad model file", onnx_bytes("external_outside", ext))
    big = m / "big"
    big.mkdir()
    use("onnx_huge_initializer", "bad model file", onnx_bytes("huge_initializer", big))
    try:
        import torch  # noqa: F401
    except ImportError:
        torch_ok = False
    else:
        torch_ok = True
    if torch_ok:
        for where in ("__setstate__", "forward"):
            marker = root / "markers" / f"from_file_{where.strip('_')}"
            trap = torchscript_trap(m, marker, where)
            use(f"torchscript_from_file_{where.strip('_')}", "code in a model", trap)
            cases.append(Case(f"models_import_torchscript_{where.strip('_')}", "code in a model",
                              ["models", "import", str(trap), "--name", f"trap{where.strip('_')}"], names=trap.name))
        trap = torchscript_trap(m, root / "markers" / "from_file_bioimageio", "__setstate__")
        rdf = _rdf(weights={"torchscript": {"source": "weights.pt"}})
        pkg = bioimageio_package(m, "torchscript_only", rdf, {"weights.pt": trap.read_bytes()})
        use("bioimageio_torchscript_weights", "code in a model", pkg)
    # a real network, so that each package is refused for the field it gets wrong, not for its weights
    weights = {"weights.onnx": (ROOT / "segstudio" / "core" / "models" / "builtin" / "nuclei-light.onnx").read_bytes()}
    for name, rdf in (
        ("inputs_is_a_string", _rdf(inputs="raw")),
        ("axes_entry_is_a_string", _rdf(inputs__axes=["batch", "channel", "y", "x"])),
        ("text_halo", _rdf(outputs__axes=[{"type": "batch"}, {"type": "channel"}, {"type": "space", "id": "y",
                                                                                    "halo": "lots"},
                                          {"type": "space", "id": "x", "halo": 16}])),
        ("preprocessing_kwargs_text", _rdf(inputs__preprocessing=[{"id": "scale_range",
                                                                   "kwargs": {"min_percentile": "low"}}])),
        ("weights_is_a_list", _rdf(weights=["onnx"])),
        ("source_leaves_package", _rdf(weights={"onnx": {"source": "../../../etc/passwd"}})),
    ):
        use(f"bioimageio_{name}", "bad model package", bioimageio_package(m, name, rdf, weights))
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    rdf = _rdf(inputs__test_tensor={"source": "test_input.npy"}, outputs__test_tensor={"source": "test_output.npy"})
    use("bioimageio_pickled_test_tensor", "bad model package",
        bioimageio_package(m, "pickled_tensor", rdf, {**weights, "test_input.npy": buf.getvalue(),
                                                     "test_output.npy": buf.getvalue()}))
    use("bioimageio_zip_bomb", "decompression bomb", zip_bomb(m))
    import zipfile

    with zipfile.ZipFile(m / "escape.zip", "w") as z:
        z.writestr("rdf.yaml", "type: model\n")
        z.writestr("../../escaped.txt", "gotcha")
    use("bioimageio_zip_escape", "bad model package", m / "escape.zip")
    return cases


# ----------------------------------------------------------------------------- running


def _snapshot(root: Path, skip: list[Path]) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not any((here / n) == s or s in (here / n).parents for s in skip)
                       and not (here / n).suffix == ".zarr"]
        for n in filenames + [x for x in os.listdir(here) if (here / x).suffix == ".zarr"]:
            p = here / n
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _prepare_case(case: Case, root: Path, out: Path) -> None:
    """Per-case state that a case's command needs (a damaged manifest to resume from)."""
    if case.name == "batch_damaged_manifest":
        out.mkdir(parents=True)
        lines = [b'{"file": 5, "status": "done"}', b"\xff\xfe garbage \x00\x00", b'{"file": "w1.tif", "status": '
                 b'"done", "input": "not a list"}', b'[1, 2, 3]', b'{"file": "w2.tif", "status": "weird"}']
        (out / "batch_manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def run_corpus(root: Path, cases: list[Case]) -> list[Result]:
    """Run ``cases`` one after the other in this process (see the module docstring)."""
    import psutil

    from segstudio.cli import main

    home = root / "home"
    for sub in ("home", "cwd", "tmp", "markers", "out"):
        (root / sub).mkdir(exist_ok=True)
    os.environ.update(HOME=str(home), SEGSTUDIO_HOME=str(home / ".segstudio"), TMPDIR=str(root / "tmp"))
    os.chdir(root / "cwd")
    proc = psutil.Process()
    results = []
    for case in cases:
        out = root / "out" / case.name.replace("/", "_")
        _prepare_case(case, root, out)
        argv = [a.replace("{out}", str(out)) for a in case.argv]
        skip = [out, home]
        before = _snapshot(root, skip)
        rss0 = proc.memory_info().rss
        peak = [rss0]
        stop = [False]

        import threading

        def sample():
            while not stop[0]:
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code, stdout, stderr, seconds = _captured(main, argv)
        stop[0] = True
        sampler.join()
        after = _snapshot(root, skip)
        changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
        markers = sorted(p.name for p in (root / "markers").iterdir())
        results.append(Result(case.name, case.kind, code, round(seconds, 2), stdout, stderr,
                              round((peak[0] - rss0) / 2**20, 1), changed, markers))
        print(f"{case.name}: exit {code} in {seconds:.1f} s", file=sys.__stdout__, flush=True)
    return results


def _captured(main, argv):
    """``main(argv)`` with file descriptors 1 and 2 captured: (exit code, stdout, stderr, seconds)."""
    import tempfile

    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fo.fileno(), 1)
        os.dup2(fe.fileno(), 2)
        t0 = time.perf_counter()
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        finally:
            seconds = time.perf_counter() - t0
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        fo.seek(0)
        fe.seek(0)
        return code, fo.read().decode(errors="replace"), fe.read().decode(errors="replace"), seconds


def main(argv: list[str] | None = None) -> int:
    """``python tests/hostile_corpus.py ROOT RESULTS.json [--no-models]``: build the corpus and run it."""
    args = argv if argv is not None else sys.argv[1:]
    root, results_path = Path(args[0]).resolve(), Path(args[1]).resolve()
    cases = make_corpus(root, with_models="--no-models" not in args)
    (root / "cases.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    results = run_corpus(root, cases)
    results_path.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
