import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from posterior_diff.evaluation.harness import HELD_OUT
from posterior_diff.training import data as training_data
from posterior_diff.training.data import (DEBIAN_SOURCES, PYPI_SOURCES, SOURCES, Photograph, Source, gather_photographs,
                                          install_missing, is_held_out_name, records)

SKIMAGE_DATA = Path(data.__file__).parent


@pytest.fixture(scope="module")
def held_out():
    return training_data.held_out_signatures()


def folder_source(folder: Path, *files: str) -> Source:
    return Source(str(folder), "folder", tuple(files))


def test_held_out_photographs_are_left_out_by_name_by_checksum_and_by_content(tmp_path, held_out):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.rocket()).save(folder / "Astronaut_2.png")  # named like a held-out photograph
    shutil.copy(SKIMAGE_DATA / "camera.png", folder / "holiday.png")  # the held-out file under another name
    chelsea = Image.fromarray(data.chelsea())
    chelsea.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((300, 200)).save(folder / "mirror.jpg", quality=80)
    Image.fromarray(data.rocket()).save(folder / "keep.png")
    Image.fromarray(data.rocket()).save(folder / "keep_again.jpg", quality=90)  # a copy of a kept one
    lines = []
    kept = gather_photographs([folder_source(folder, "Astronaut_2.png", "holiday.png", "mirror.jpg", "keep.png",
                                             "keep_again.jpg", "absent.png")],
                              install=False, held_out=held_out, log=lines.append)
    assert [p.file for p in kept] == ["keep.png"]
    text = "\n".join(lines)
    assert "Astronaut_2.png: named like a held-out" in text
    assert "holiday.png: the same file as held-out camera" in text
    assert "mirror.jpg: the same photograph as held-out chelsea" in text
    assert "keep_again.jpg: the same photograph as keep.png" in text
    assert "absent.png" in text


def test_pywavelets_camera_is_the_held_out_cameraman_by_content(tmp_path, held_out):
    pywt = pytest.importorskip("pywt")
    source = next(s for s in PYPI_SOURCES if s.package == "PyWavelets")
    assert "data/camera.npz" not in source.files and is_held_out_name("data/camera.npz", HELD_OUT)
    camera = np.load(Path(pywt.__file__).parent / "data" / "camera.npz")["data"]
    Image.fromarray(camera).save(tmp_path / "cameraman_copy.png")
    lines = []
    assert gather_photographs([folder_source(tmp_path, "cameraman_copy.png")], install=False, held_out=held_out,
                              log=lines.append) == []
    assert "held-out camera" in lines[0]


def test_the_package_sources_keep_no_held_out_photograph_never_import_matplotlib_and_record_checksums(monkeypatch, held_out):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now raises ImportError
    lines = []
    photographs = gather_photographs(PYPI_SOURCES, install=False, held_out=held_out, log=lines.append)
    packages = {p.package for p in photographs}
    # Which sample photographs a scikit-image release ships varies; every listed one it ships is gathered.
    skimage = next(s for s in PYPI_SOURCES if s.package == "scikit-image")
    shipped = {skimage.recorded_file(file) for file in skimage.files if skimage.path(file).exists()}
    assert "scikit-image" in packages and shipped
    assert {p.file for p in photographs if p.package == "scikit-image"} == shipped
    for photograph in photographs:
        assert not is_held_out_name(photograph.file, HELD_OUT)
        assert "matplotlib" not in photograph.file
        source = next(s for s in PYPI_SOURCES if s.package == photograph.package)
        path = source.root().parent / photograph.file
        assert hashlib.sha256(path.read_bytes()).hexdigest() == photograph.sha256
        assert photograph.image.mode in ("L", "RGB") and min(photograph.image.size) >= 172
    assert not any("held-out" in line for line in lines)  # the lists leave them out already
    entries = records(photographs)
    assert set(entries[0]) == {"package", "version", "file", "sha256", "size", "mode"}
    assert entries[0]["version"] and entries[0]["file"] == "skimage/data/rocket.jpg"


def test_the_registry_names_no_held_out_or_matplotlib_file():
    for source in SOURCES:
        assert "matplotlib" not in source.package.lower() and "mpl" not in " ".join(source.files)
        for file in source.files:
            assert not is_held_out_name(file, HELD_OUT), file
    assert {s.package for s in DEBIAN_SOURCES} >= {"mate-backgrounds", "plasma-workspace-wallpapers"}
    with pytest.raises(ValueError, match="matplotlib"):
        Source("matplotlib", "pypi", ("mpl-data/sample_data/grace_hopper.jpg",), "matplotlib")


def test_a_folder_inside_matplotlib_is_refused(tmp_path, held_out):
    folder = tmp_path / "matplotlib" / "mpl-data" / "sample_data"
    folder.mkdir(parents=True)
    Image.fromarray(data.rocket()).save(folder / "grace.png")
    with pytest.raises(ValueError, match="inside matplotlib"):
        gather_photographs([folder_source(folder, "grace.png")], install=False, held_out=held_out)


def test_install_missing_uses_pip_and_apt_get(monkeypatch):
    calls = []

    class Done:
        returncode = 0

    def run(command, **kwargs):
        calls.append(command)
        return Done()

    missing = [Source("no-such-dist", "pypi", ("a.png",), "no_such_module_for_posterior_diff_tests"),
               Source("no-such-debian-package", "debian", ("/nowhere/a.jpg",))]
    monkeypatch.setattr(training_data.os, "geteuid", lambda: 0)
    monkeypatch.setattr(training_data.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "apt-get" else None)
    notes = install_missing(missing, log=lambda line: None, run=run)
    assert calls[0] == [sys.executable, "-m", "pip", "install", "no-such-dist"]
    assert calls[1][:4] == ["apt-get", "install", "-y", "--no-install-recommends"] and calls[1][-1] == "no-such-debian-package"
    assert any("no-such-dist is not installed" in note for note in notes)  # the fake pip installed nothing
    calls.clear()
    monkeypatch.setattr(training_data.os, "geteuid", lambda: 1000)
    notes = install_missing(missing[1:], log=lambda line: None, run=run)
    assert calls == [] and "needs root" in notes[0]


def test_photographs_from_arrays_and_odd_modes_read_as_grey_or_rgb(tmp_path):
    np.savez(tmp_path / "grey.npz", data=np.arange(64 * 48, dtype=np.uint8).reshape(48, 64))
    Image.new("RGBA", (40, 30), (10, 200, 30, 128)).save(tmp_path / "alpha.png")
    Image.new("LA", (40, 30), (90, 255)).save(tmp_path / "grey_alpha.png")
    assert training_data._read(tmp_path / "grey.npz").mode == "L"
    assert training_data._read(tmp_path / "alpha.png").mode == "RGB"
    assert training_data._read(tmp_path / "grey_alpha.png").mode == "L"
    photograph = Photograph("p", "f", "0" * 64, Image.new("L", (3, 2)), None)
    assert records([photograph])[0]["size"] == [3, 2]


def test_exported_photographs_read_back_with_their_records_and_checksums_checked(tmp_path, held_out):
    from posterior_diff.training.data import export_photographs, read_exported

    skimage = next(s for s in PYPI_SOURCES if s.package == "scikit-image")
    subset = Source(skimage.package, "pypi", ("data/coins.png", "data/text.png"), "skimage")
    photographs = gather_photographs([subset], install=False, held_out=held_out)
    export_photographs(photographs, tmp_path / "export", "scikit-image")
    again, sources = read_exported(tmp_path / "export", held_out=held_out)
    assert sources == "scikit-image" and records(again) == records(photographs)
    copied = tmp_path / "export" / "scikit-image" / "coins.png"
    copied.write_bytes(copied.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match="sha256 differs"):
        read_exported(tmp_path / "export", held_out=held_out)
    copied.unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 file"):
        read_exported(tmp_path / "export", held_out=held_out)
