"""Shared fixtures: real photos (shipped by scikit-image), hostile files, and a way to run the CLI."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from wanwu.bench.attacks import Daemon

REPO = Path(__file__).resolve().parent.parent

# ImageNet classes a correct model gives these photos (top-1).
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(scope="session", autouse=True)
def _engine_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One compiled-model cache per test session, shared by the CLI's processes."""
    os.environ.setdefault("WANWU_CACHE_DIR", str(tmp_path_factory.mktemp("wanwu-cache")))


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos as RGB uint8 arrays."""
    import skimage.data as data

    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
            "rocket": data.rocket()}


@pytest.fixture(scope="session")
def images(photos) -> dict[str, bytes]:
    """Two encoded photos for the serving doors: a JPEG cat and a PNG cup of coffee."""
    return {"chelsea": jpeg_bytes(photos["chelsea"]), "coffee": png_bytes(photos["coffee"])}


def jpeg_bytes(arr: np.ndarray, quality: int = 90, size: tuple[int, int] | None = None) -> bytes:
    im = Image.fromarray(arr)
    if size:
        im = im.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A real, valid PNG of 12000 x 12000 black pixels: a few hundred kB, 144 megapixels."""
    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def write_slow_png(path: Path, side: int = 7000) -> None:
    """A valid PNG of ``side`` x ``side`` varied pixels: 49 megapixels by default, seconds to decode,
    and 147 MB of pixels that the decoding process's memory shows while it holds them."""
    ramp = np.arange(side)
    pixels = np.empty((side, side, 3), np.uint8)
    pixels[..., 0] = (ramp % 256).astype(np.uint8)[None, :]
    pixels[..., 1] = (ramp % 256).astype(np.uint8)[:, None]
    pixels[..., 2] = (ramp // 7 % 256).astype(np.uint8)[None, :] + (ramp // 5 % 256).astype(np.uint8)[:, None]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    path.write_bytes(buf.getvalue())


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def write_hostile(folder: Path, photos: dict[str, np.ndarray]) -> dict[str, str]:
    """Bad inputs, each named by key, with the error type each must produce."""
    folder.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(photos["coffee"])
    files = {
        "empty.jpg": (b"", "ReadError"),
        "truncated.jpg": (good[: len(good) // 2], "DecodeError"),
        "notes.jpg": ("这不是图片 this is not an image\n".encode(), "DecodeError"),
        "random.png": (np.random.default_rng(0).bytes(5000), "DecodeError"),
        "bomb.png": (bomb_png(), "PixelLimitError"),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    # 1 GiB of nothing (sparse: no disk), more than any image within the default pixel limit
    # can be: refused unread (ReadError), where reading it whole would cost a GiB per copy.
    os.truncate(_touch(folder / "huge.tif"), 1 << 30)
    return {name: err for name, (_, err) in files.items()} | {"huge.tif": "ReadError"}


def _touch(path: Path) -> Path:
    path.touch()
    return path


def write_photos(folder: Path, photos: dict[str, np.ndarray]) -> dict[str, str]:
    """Good photos under awkward names; returns key -> photo name."""
    (folder / "子目录 sub").mkdir(parents=True, exist_ok=True)
    layout = {
        "猫 chelsea.jpg": ("chelsea", jpeg_bytes(photos["chelsea"])),
        "子目录 sub/coffee big.JPG": ("coffee", jpeg_bytes(photos["coffee"], size=(1800, 1200))),
        "astronaut.png": ("astronaut", png_bytes(photos["astronaut"])),
        "coffee-really-png.jpg": ("coffee", png_bytes(photos["coffee"])),  # wrong extension, still an image
        "rocket.webp": ("rocket", _encode(photos["rocket"], "WEBP")),
    }
    for key, (_, data) in layout.items():
        (folder / key).write_bytes(data)
    return {key: name for key, (name, _) in layout.items()}


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def make_corpus(folder: Path, photos: dict[str, np.ndarray], n: int) -> list[str]:
    """``n`` JPEGs of varied sizes cropped from the real photos; returns their keys."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = sorted(photos)
    keys = []
    for i in range(n):
        arr = photos[names[i % len(names)]]
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        scale = rng.uniform(0.8, 2.5)
        crop = arr[y:y + ch, x:x + cw]
        key = f"{i // 50:02d}/img_{i:05d}.jpg"
        (folder / key).parent.mkdir(exist_ok=True)
        (folder / key).write_bytes(jpeg_bytes(crop, size=(int(cw * scale), int(ch * scale))))
        keys.append(key)
    return keys


@pytest.fixture(scope="module")
def backend():
    """The real model behind the in-process serving backend, loaded once per test module."""
    from wanwu.pipeline.serve.inprocess import InProcessBackend

    backend = InProcessBackend("efficientnet_lite0", top_k=5)
    backend.start()
    yield backend
    backend.shutdown()


def in_threads(fn: Callable[[int], None], n: int, timeout: float = 180) -> list[BaseException]:
    """Run ``fn(0) .. fn(n - 1)`` in ``n`` threads at once; return what they raised."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001 (handed to the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    errors.extend(TimeoutError(f"{t.name} still running after {timeout} s") for t in threads if t.is_alive())
    return errors


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of the live processes whose parent is ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            if ppid == pid and state != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def listening_unix_paths(pids: list[int]) -> list[str]:
    """The paths of the listening Unix sockets the processes ``pids`` hold, once per socket.

    ZeroMQ lets a second ``bind`` of an ipc path silently replace the first, so a path listed
    twice means two processes each believe they own one address, and one of them is deaf.
    """
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        except OSError:
            continue
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is __SO_ACCEPTCON (listening)
        if len(fields) == 8 and int(fields[3], 16) & 0x10000 and fields[6] in inodes:
            paths.append(fields[7])
    return paths


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def segments_of(pid: int) -> list[str]:
    """Shared-memory files named after ``pid`` (the pool is a nameless memfd: there should be none)."""
    from wanwu.pipeline.topology.shm import shm_dir

    return [p.name for p in shm_dir().glob(f"wanwu-{pid}-*")]


def proc_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc ("Z" when it is gone or a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


# A ``wanwu serve`` child process (the attack report starts its daemons the same way).
Served = Daemon


def wanwu_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "wanwu", *args]


def run_wanwu(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process."""
    return subprocess.run(wanwu_cmd(*args), capture_output=True, text=True, timeout=timeout, **kwargs)


def run_on_a_full_disk(folder: Path, size: str, *args: str, then: str = "") -> subprocess.CompletedProcess:
    """``wanwu ARGS`` with a tmpfs of ``size`` (``128k``) mounted at ``folder``, in a user and mount
    namespace of the test's own, so that the disk under it fills up for real; ``then`` runs after
    it in the same namespace (the tmpfs is gone once it ends). Skips where namespaces are off."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in wanwu_cmd(*args))
    after = f"{then}; " if then else ""
    mount = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))}"
    script = f"{mount} && {command}; status=$?; {after}exit $status"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)


# --- 万物识别 (ModelScope general recognition) stand-ins: the real weights cannot be downloaded here.

GENERAL_CLASSES = 54_092


def original_resnest_shapes(num_classes: int, layers=(3, 4, 23, 3), stem: int = 64, radix: int = 2) -> dict:
    """Tensor names and shapes of the original ResNeSt code (zhanghang1989/ResNeSt, as ModelScope ships it).

    Written from the original module layout, not from timm: deep stem ``conv1`` (a
    Sequential of conv, bn, relu, conv, bn, relu, conv), ``bn1``, bottlenecks with a
    split-attention ``conv2`` (``conv``, ``bn0``, ``fc1``, ``bn1``, ``fc2``), and
    ``downsample`` = (AvgPool2d, conv, bn) in the first block of each stage.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{key}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.0.weight"] = (stem, 3, 3, 3)
    bn("conv1.1", stem)
    shapes["conv1.3.weight"] = (stem, stem, 3, 3)
    bn("conv1.4", stem)
    shapes["conv1.6.weight"] = (2 * stem, stem, 3, 3)
    bn("bn1", 2 * stem)
    inplanes = 2 * stem
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for block in range(blocks):
            p, width = f"layer{stage}.{block}", planes  # bottleneck_width 64, cardinality 1
            inter = max(width * radix // 4, 32)
            shapes[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.conv.weight"] = (width * radix, width // radix, 3, 3)  # groups = radix
            bn(f"{p}.conv2.bn0", width * radix)
            shapes[f"{p}.conv2.fc1.weight"], shapes[f"{p}.conv2.fc1.bias"] = (inter, width, 1, 1), (inter,)
            bn(f"{p}.conv2.bn1", inter)
            shapes[f"{p}.conv2.fc2.weight"], shapes[f"{p}.conv2.fc2.bias"] = (width * radix, inter, 1, 1), (width * radix,)
            shapes[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if block == 0:
                shapes[f"{p}.downsample.1.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.2", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 512 * 4), (num_classes,)
    return shapes


def random_resnest_state(shapes: dict, seed: int = 0) -> dict:
    """Random but well-scaled tensors for ``shapes``: activations stay O(1) through 33 blocks.

    He-initialised convolutions, BatchNorm scales near 1 except a small last one in
    each block (so the residual sum does not grow), fc at std 0.02.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        t = torch.empty(shape)
        if key.endswith("num_batches_tracked"):
            t = torch.tensor(0, dtype=torch.long)
        elif len(shape) == 4:
            t.normal_(0, (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5, generator=g)
        elif key.endswith("running_var"):
            t.uniform_(0.5, 1.5, generator=g)
        elif key.endswith("running_mean"):
            t.normal_(0, 0.1, generator=g)
        elif ".bn3.weight" in key:
            t.uniform_(0.1, 0.3, generator=g)
        elif key.endswith(".weight") and len(shape) == 1:
            t.uniform_(0.5, 1.0, generator=g)
        elif key == "fc.weight":
            t.normal_(0, 0.02, generator=g)
        else:
            t.normal_(0, 0.05, generator=g)
        state[key] = t
    return state


def write_general_recognition(folder: Path, num_classes: int, seed: int = 0, state: dict | None = None) -> Path:
    """A ModelScope-style folder: ``pytorch_model.pt`` (DataParallel names in ``{"state_dict"}``),
    ``meta_info.txt`` (``index<TAB>label``) and a ``configuration.json`` as ModelScope keeps."""

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = random_resnest_state(original_resnest_shapes(num_classes), seed)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "pytorch_model.pt")
    (folder / "meta_info.txt").write_text("".join(f"{i}\t{general_label(i)}\n" for i in range(num_classes)),
                                          encoding="utf-8")
    (folder / "configuration.json").write_text(json.dumps({"task": "general-recognition"}), encoding="utf-8")
    return folder


def general_label(class_id: int) -> str:
    """The made-up Chinese label of ``class_id`` in the stand-in ``meta_info.txt``."""
    return f"万物{class_id:05d}号"


@pytest.fixture(scope="session")
def general_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full-size stand-in of ``damo/cv_resnest101_general_recognition``: 54,092 classes, random
    weights (~630 MB), built once per session."""
    return write_general_recognition(tmp_path_factory.mktemp("modelscope") / "cv_resnest101_general_recognition",
                                     GENERAL_CLASSES)


@pytest.fixture(scope="session")
def lite0_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded model exported once per session: float32 and uint8 ONNX, an OpenVINO IR, its labels."""
    from wanwu.stages.models import export
    from wanwu.stages.models.resolve import resolve_model

    folder = tmp_path_factory.mktemp("lite0-exports")
    spec = resolve_model("efficientnet_lite0")
    return {
        "onnx_f32": export.export_onnx(spec, folder / "lite0.onnx", input_kind="float32"),
        "onnx_u8": export.export_onnx(spec, folder / "lite0-u8.onnx", input_kind="uint8"),
        "ir": export.export_openvino(spec, folder / "lite0.xml"),
        "labels": export.copy_labels(spec, folder),
    }
