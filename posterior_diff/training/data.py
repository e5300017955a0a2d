"""Training photographs for the embedded prior, all from installable packages (no downloads).

`SOURCES` lists every package whose photographs the embedded model may be trained on, and
exactly which of its files:

- PyPI: scikit-image's sample photographs (`posterior_diff.evaluation.TRAINING_PHOTOGRAPHS`
  and both views of `stereo_motorcycle`), scikit-learn's `load_sample_images` (china, flower),
  PyWavelets' `pywt.data` (ascent, aero; its `camera` is scikit-image's held-out cameraman).
- Debian: the photographs (not the drawn or rendered artwork) of the desktop-background
  packages mate-backgrounds (nature/), plasma-workspace-wallpapers (the photographic
  wallpapers; the other sizes in their folders are links to the one listed), lomiri-wallpapers-16.04 and lomiri-wallpapers-20.04
  (the photographs among Ubuntu's community wallpapers). Each file was chosen by looking at it.

`install_missing(SOURCES)` installs what is missing (pip into this interpreter's environment,
apt-get for Debian packages when running as root where apt works); `gather_photographs()` reads
the files and returns `Photograph(package, file, sha256, image, version, path)` for each, after
excluding the held-out evaluation photographs (`evaluation.HELD_OUT`): by name (any file whose
name contains a held-out name as a word) and by content (a downscaled grey version that
correlates with one of a held-out photograph, or an identical checksum; this is what excludes a
copy under another name, such as PyWavelets' camera). Duplicates within the sources (same
checksum or same content) are kept once. matplotlib's sample data is never read: a path
inside matplotlib raises, and nothing here imports it.

For a machine without these packages (a GPU box with no network), `export_photographs` copies
the files byte for byte with a manifest, and `read_exported` reads them back there, checking
each file's sha256 against the manifest and the held-out photographs again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["Source", "Photograph", "SOURCES", "PYPI_SOURCES", "DEBIAN_SOURCES", "install_missing", "gather_photographs",
           "held_out_signatures", "signature", "is_held_out_name", "records", "summary", "export_photographs",
           "read_exported", "MANIFEST", "VALIDATION_FILES", "split_validation", "as_tensors"]


CONTENT_THRESHOLD = 0.9  # correlation of 32 x 32 grey signatures above which two photographs are the same
SIGNATURE_SIZE = 32


@dataclass(frozen=True)
class Source:
    """One package and the files in it that are training photographs.

    Attributes:
        package: the PyPI distribution or Debian package name (for kind "folder": the folder).
        kind: "pypi", "debian" or "folder" (photographs of your own in a local folder).
        files: paths of the photographs: for PyPI relative to the import package's folder, for
            Debian absolute (as `dpkg -L` lists them), for a folder relative to it. `.npz` files
            hold one uint8 array.
        import_name: the import name of a PyPI package (its folder in site-packages).
        note: what the photographs are.
    """

    package: str
    kind: str
    files: tuple[str, ...]
    import_name: str | None = None
    note: str = ""

    def __post_init__(self):
        if self.kind not in ("pypi", "debian", "folder"):
            raise ValueError(f"kind must be pypi, debian or folder, got {self.kind!r}")
        if self.kind == "pypi" and not self.import_name:
            raise ValueError(f"the PyPI source {self.package} needs its import_name")
        if "matplotlib" in (self.package.lower(), (self.import_name or "").lower()):
            raise ValueError("matplotlib's sample data is never used for training")

    def root(self) -> Path | None:
        """The folder `files` are relative to, or None while the package is not installed."""
        if self.kind == "debian":
            return Path("/")
        if self.kind == "folder":
            return Path(self.package) if Path(self.package).is_dir() else None
        spec = importlib.util.find_spec(self.import_name)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])

    def installed(self) -> bool:
        if self.kind in ("pypi", "folder"):
            return self.root() is not None
        return _debian_version(self.package) is not None

    def version(self) -> str | None:
        if self.kind == "folder":
            return None
        if self.kind == "pypi":
            try:
                return metadata.version(self.package)
            except metadata.PackageNotFoundError:
                return None
        return _debian_version(self.package)

    def recorded_file(self, file: str) -> str:
        """The file as recorded: relative to site-packages for PyPI (`skimage/data/rocket.jpg`),
        absolute for Debian, relative to the folder for a folder."""
        return f"{self.import_name}/{file}" if self.kind == "pypi" else file

    def path(self, file: str) -> Path:
        """Where `file` is on this machine (the package must be installed)."""
        return Path(file) if self.kind == "debian" else self.root() / file


class Photograph(NamedTuple):
    """One training photograph: its package, the file inside it, the file's sha256, the image
    (a PIL image, mode "L" or "RGB"), the package's version (None if unknown) and where the
    file was read on this machine."""

    package: str
    file: str
    sha256: str
    image: Image.Image
    version: str | None = None
    path: str | None = None


_SKIMAGE_FILES = ("rocket.jpg", "coins.png", "clock_motion.png", "moon.png", "brick.png", "grass.png", "gravel.png",
                  "cell.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "page.png", "text.png",
                  "motorcycle_left.png", "motorcycle_right.png")

PYPI_SOURCES = (
    Source("scikit-image", "pypi", tuple(f"data/{name}" for name in _SKIMAGE_FILES), "skimage",
           "scikit-image's sample photographs except the held-out ones (evaluation.TRAINING_PHOTOGRAPHS, stereo_motorcycle)"),
    Source("scikit-learn", "pypi", ("datasets/images/china.jpg", "datasets/images/flower.jpg"), "sklearn",
           "sklearn.datasets.load_sample_images"),
    Source("PyWavelets", "pypi", ("data/ascent.npz", "data/aero.npz"), "pywt",
           "pywt.data.ascent and aero; pywt.data.camera is the held-out cameraman and is left out"),
)

_PLASMA_PHOTOGRAPHS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                       "Kite", "OneStandsOut", "Path", "summer_1am")
_LOMIRI_1604 = ("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
                "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "free_by_Peter_Nerlich",
                "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
                "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi")
_MATE_NATURE = ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
                "TwoWings", "Wood", "YellowFlower")

# Checked in Debian 12 (bookworm). Left out as drawn or rendered artwork: gnome-backgrounds 43 (all of it),
# ukui-wallpapers, lomiri-wallpapers (logo art), desktop-base and sway-backgrounds (themes), mate's abstract/ and
# desktop/ folders, the other Plasma wallpapers, lomiri's umang, analogpattern, Fossa, Infinite-Sea, Painting-Colors.
DEBIAN_SOURCES = (
    Source("mate-backgrounds", "debian", tuple(f"/usr/share/backgrounds/mate/nature/{name}.jpg" for name in _MATE_NATURE),
           note="MATE's nature photographs (flowers, leaves, water, dunes, wood)"),
    Source("plasma-workspace-wallpapers", "debian",
           tuple(f"/usr/share/wallpapers/{name}/contents/images/2560x1600.jpg" for name in _PLASMA_PHOTOGRAPHS),
           note="Plasma's photographic wallpapers (the other sizes in each folder are links to this one)"),
    Source("lomiri-wallpapers-16.04", "debian", tuple(f"/usr/share/backgrounds/{name}.jpg" for name in _LOMIRI_1604),
           note="Ubuntu community photographs as shipped with Ubuntu Touch 16.04"),
    Source("lomiri-wallpapers-20.04", "debian", ("/usr/share/backgrounds/Kleiber_by_Lukas_Baubkus.jpg",),
           note="the photograph among the Ubuntu Touch 20.04 wallpapers"),
)

SOURCES = PYPI_SOURCES + DEBIAN_SOURCES

# Photographs kept out of training to choose a recipe on (never the evaluation's held-out ones,
# which stay unseen until the final measurement): one each of flowers, rocks and sea, a town and a
# still life, from the Debian packages, which have the most photographs to spare.
VALIDATION_FILES = ("/usr/share/backgrounds/mate/nature/FreshFlower.jpg",
                    "/usr/share/wallpapers/ColdRipple/contents/images/2560x1600.jpg",
                    "/usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg",
                    "/usr/share/wallpapers/ColorfulCups/contents/images/2560x1600.jpg")


# -- installing -------------------------------------------------------------------------


def _debian_version(package: str) -> str | None:
    """The installed version of a Debian package, None if it is not installed (or there is no dpkg)."""
    if shutil.which("dpkg-query") is None:
        return None
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package], capture_output=True, text=True)
    if result.returncode != 0 or "\t" not in result.stdout:
        return None
    status, version = result.stdout.split("\t", 1)
    return version if status.endswith(" installed") else None


def install_missing(sources: Sequence[Source] = SOURCES, *, log: Callable[[str], None] = print,
                    run: Callable = subprocess.run) -> list[str]:
    """Install the packages of `sources` that are missing; returns a note per package not installed.

    PyPI packages: `python -m pip install` into this interpreter's environment. Debian packages:
    `apt-get install --no-install-recommends` (after `apt-get update` if the first try fails), only
    when running as root with apt-get present. Nothing else is downloaded.
    """
    notes = []
    pypi = [source.package for source in sources if source.kind == "pypi" and not source.installed()]
    if pypi:
        log(f"pip install {' '.join(pypi)}")
        if run([sys.executable, "-m", "pip", "install", *pypi]).returncode != 0:
            notes.append(f"pip could not install {', '.join(pypi)}")
        importlib.invalidate_caches()
    debian = [source.package for source in sources if source.kind == "debian" and not source.installed()]
    if debian:
        if shutil.which("apt-get") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
            notes.append(f"not installed (apt-get needs root and apt): {', '.join(debian)}")
        else:
            command = ["apt-get", "install", "-y", "--no-install-recommends", *debian]
            environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            log(" ".join(command))
            if run(command, env=environment).returncode != 0:
                run(["apt-get", "update"], env=environment)
                if run(command, env=environment).returncode != 0:
                    notes.append(f"apt-get could not install {', '.join(debian)}")
    for source in sources:
        if not source.installed():
            notes.append(f"{source.package} is not installed: its photographs are left out")
    return list(dict.fromkeys(notes))


# -- reading and checking -------------------------------------------------------------


def _refuse_matplotlib(path: Path) -> None:
    """matplotlib's sample data must never be used for training or tuning."""
    if any(part in ("matplotlib", "mpl-data", "mpl_toolkits") for part in Path(path).parts):
        raise ValueError(f"{path} is inside matplotlib, whose sample data is never used for training")


def _read(path: Path) -> Image.Image:
    """A photograph file as a PIL image, mode "L" (grey) or "RGB"."""
    _refuse_matplotlib(path)
    if path.suffix == ".npz":
        with np.load(path) as archive:
            array = archive[archive.files[0]]
        if array.dtype != np.uint8:
            raise ValueError(f"{path} holds a {array.dtype} array, not uint8")
        return Image.fromarray(array)
    with Image.open(path) as handle:
        handle.load()
        if handle.mode in ("L", "RGB"):
            return handle.copy()
        if handle.mode in ("1", "LA", "P") and _is_grey(handle):
            return handle.convert("L")
        if handle.mode.startswith("I"):  # 16- or 32-bit grey: scale to 8 bits by the type's maximum
            array = np.asarray(handle, dtype=np.float64)
            return Image.fromarray(np.round(array / (65535 if array.max() > 255 else 255) * 255).astype(np.uint8))
        return handle.convert("RGB")  # RGBA, P, CMYK, YCbCr: the colours, without transparency


def _is_grey(image: Image.Image) -> bool:
    array = np.asarray(image.convert("RGB"))
    return bool((array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all())


def signature(image: Image.Image) -> np.ndarray:
    """A 32 x 32 grey version of the whole image, zero mean and unit norm, to compare contents."""
    grey = image.convert("L").resize((SIGNATURE_SIZE, SIGNATURE_SIZE), Image.Resampling.BOX)
    vector = np.asarray(grey, dtype=np.float64).ravel()
    vector = vector - vector.mean()
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


def _signatures(image: Image.Image) -> list[np.ndarray]:
    """The signatures of the image and its mirror images, so a flipped copy is found too."""
    return [signature(image), signature(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
            signature(image.transpose(Image.Transpose.FLIP_TOP_BOTTOM))]


def is_held_out_name(file: str, held_out: Iterable[str]) -> bool:
    """Whether a file's name holds a held-out photograph's name as a word (`camera.npz`, `Chelsea_2.jpg`)."""
    words = set(re.split(r"[^a-z0-9]+", Path(file).name.lower()))
    return any(name.lower() in words for name in held_out)


def held_out_signatures() -> dict[str, dict]:
    """The held-out photographs (evaluation.HELD_OUT, read from scikit-image's files): name ->
    {"sha256", "signature"}."""
    from skimage import data

    from posterior_diff.evaluation.harness import HELD_OUT

    found = {}
    for name in HELD_OUT:
        array = np.asarray(getattr(data, name)())
        found[name] = {"signature": signature(Image.fromarray(array)),
                       "sha256": _sha256_of_named_file(Path(data.__file__).parent, name)}
    return found


def _sha256_of_named_file(folder: Path, name: str) -> str | None:
    for suffix in (".png", ".jpg"):
        path = folder / f"{name}{suffix}"
        if path.exists():
            return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def _same_content(signatures: list[np.ndarray], reference: np.ndarray, threshold: float) -> bool:
    return max(float(candidate @ reference) for candidate in signatures) > threshold


def gather_photographs(sources: Sequence[Source] = SOURCES, *, install: bool = True,
                       held_out: dict[str, dict] | None = None, threshold: float = CONTENT_THRESHOLD,
                       log: Callable[[str], None] | None = None) -> list[Photograph]:
    """Read the training photographs of `sources`, excluding held-out and duplicate ones.

    Args:
        sources: the packages and files to read (SOURCES: every one of them).
        install: install missing packages first (`install_missing`); otherwise those are skipped.
        held_out: the photographs to keep out, name -> {"sha256", "signature"}
            (default `held_out_signatures()`: the evaluation's held-out photographs).
        threshold: the signature correlation above which two photographs count as the same.
        log: receives a line for each file left out and each package missing.

    Returns:
        One Photograph per file kept, in the order of `sources`.
    """
    log = log or (lambda line: None)
    if install:
        for note in install_missing(sources, log=log):
            log(note)
    held_out = held_out_signatures() if held_out is None else held_out
    held_out_sums = {entry["sha256"]: name for name, entry in held_out.items() if entry.get("sha256")}
    kept: list[Photograph] = []
    kept_signatures: list[np.ndarray] = []
    seen_sums: set[str] = set()
    for source in sources:
        root = source.root()
        if root is None or not source.installed():
            log(f"{source.package} is not installed: skipped")
            continue
        _refuse_matplotlib(root.resolve())
        version = source.version()
        for file in source.files:
            path = source.path(file)
            recorded = source.recorded_file(file)
            if is_held_out_name(file, held_out):
                log(f"left out {source.package}:{recorded}: named like a held-out photograph")
                continue
            if not path.exists():
                log(f"missing from {source.package} {version}: {recorded}")
                continue
            _refuse_matplotlib(path.resolve())
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            if digest in held_out_sums:
                log(f"left out {source.package}:{recorded}: the same file as held-out {held_out_sums[digest]}")
                continue
            if digest in seen_sums:
                log(f"left out {source.package}:{recorded}: a copy of a file already kept")
                continue
            image = _read(path)
            candidates = _signatures(image)
            twin = next((name for name, entry in held_out.items()
                         if _same_content(candidates, entry["signature"], threshold)), None)
            if twin is not None:
                log(f"left out {source.package}:{recorded}: the same photograph as held-out {twin}")
                continue
            copy_of = next((index for index, kept_signature in enumerate(kept_signatures)
                            if _same_content(candidates, kept_signature, threshold)), None)
            if copy_of is not None:
                log(f"left out {source.package}:{recorded}: the same photograph as {kept[copy_of].file}")
                continue
            kept.append(Photograph(source.package, recorded, digest, image, version, str(path)))
            kept_signatures.append(candidates[0])
            seen_sums.add(digest)
    return kept


def split_validation(photographs: Sequence[Photograph],
                     validation_files: Iterable[str] = VALIDATION_FILES) -> tuple[list[Photograph], list[Photograph]]:
    """(training, validation): the photographs whose recorded file is in `validation_files` are
    the validation set, the others the training set, both in their original order."""
    chosen = set(validation_files)
    return ([p for p in photographs if p.file not in chosen], [p for p in photographs if p.file in chosen])


def as_tensors(photographs: Sequence[Photograph]) -> list[torch.Tensor]:
    """The photographs as uint8 (C, H, W) tensors, C = 1 for grey ones (training converts each
    crop to the model's channels)."""
    arrays = [np.asarray(p.image) for p in photographs]
    return [torch.from_numpy((a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1).copy())  # PIL's arrays are read-only
            for a in arrays]


# -- recording --------------------------------------------------------------------------


def records(photographs: Sequence[Photograph]) -> list[dict]:
    """What training_data.json holds per photograph: package, version, file, sha256, size [w, h], mode."""
    return [{"package": p.package, "version": p.version, "file": p.file, "sha256": p.sha256,
             "size": list(p.image.size), "mode": p.image.mode} for p in photographs]


def summary(photographs: Sequence[Photograph]) -> dict[str, dict]:
    """Per package: photographs and megapixels."""
    table: dict[str, dict] = {}
    for p in photographs:
        entry = table.setdefault(p.package, {"version": p.version, "photographs": 0, "megapixels": 0.0})
        entry["photographs"] += 1
        entry["megapixels"] += p.image.size[0] * p.image.size[1] / 1e6
    return table


# -- carrying the photographs to a machine without the packages (a GPU box) --------------

MANIFEST = "training_data.json"


def export_photographs(photographs: Sequence[Photograph], folder: str | Path, sources: str = "") -> Path:
    """Copy the photographs' files, byte for byte, into `folder` (PACKAGE/NAME) with a manifest
    `training_data.json` (records() plus "copied_as"), for `read_exported` on another machine."""
    folder = Path(folder)
    entries = records(photographs)
    used: set[str] = set()
    for entry, photograph in zip(entries, photographs):
        if photograph.path is None:
            raise ValueError(f"{photograph.file}: no file to copy (the photograph was not read from one)")
        stem, suffix = Path(photograph.file).stem, Path(photograph.file).suffix
        name, count = f"{photograph.package}/{stem}{suffix}", 1
        while name in used:
            name, count = f"{photograph.package}/{stem}_{count}{suffix}", count + 1
        used.add(name)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photograph.path, folder / name)
        entry["copied_as"] = name
    (folder / MANIFEST).write_text(json.dumps({"sources": sources, "photographs": entries}, indent=1))
    return folder


def read_exported(folder: str | Path, *, held_out: dict[str, dict] | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[list[Photograph], str]:
    """The photographs of an `export_photographs` folder, each checked against the manifest's
    checksum and again for held-out photographs; returns them (with their original package,
    file and version) and the sources the export was made from.

    Raises:
        FileNotFoundError: no manifest, or a file it lists is missing.
        ValueError: a file whose checksum differs from the manifest's.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST}: not a folder written by export_photographs (--export-data)")
    manifest = json.loads((folder / MANIFEST).read_text())
    entries = {entry["copied_as"]: entry for entry in manifest["photographs"]}
    absent = [name for name in entries if not (folder / name).is_file()]
    if absent:
        raise FileNotFoundError(f"{folder} lacks {len(absent)} file(s) of its manifest, e.g. {absent[0]}")
    found = gather_photographs([Source(str(folder), "folder", tuple(entries))], install=False, held_out=held_out, log=log)
    photographs = []
    for photograph in found:
        entry = entries[photograph.file]
        if photograph.sha256 != entry["sha256"]:
            raise ValueError(f"{folder / photograph.file}: its sha256 differs from the one {MANIFEST} records")
        photographs.append(photograph._replace(package=entry["package"], file=entry["file"], version=entry["version"]))
    return photographs, manifest.get("sources", "")

