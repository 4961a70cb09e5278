"""duokit.data.manifest and `duokit data`: the real fetch/verify code with local fakes of the two network calls.

The fakes replace only `huggingface_hub.hf_hub_download` and `gdown.download`; every call is first bound
to the real function's signature, so a wrong keyword (e.g. gdown 6's removed `fuzzy=`) fails the test.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import shutil
import stat
import zipfile
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import gdown
import huggingface_hub
import pytest
import yaml
from gdown.exceptions import DownloadError, FileURLRetrievalError

from duokit.cli import main
from duokit.data import manifest as mf

ANNOTATIONS = json.dumps([{"video": "VNBench_new/x.mp4", "try": 0}]).encode()
VIDEOS = {"ret_edit1_a.mp4": os.urandom(5000), "sub/cnt_insert1_b.mp4": os.urandom(3000)}
COMMIT = "1" * 40
REAL_HUB_DOWNLOAD = huggingface_hub.hf_hub_download
REAL_GDOWN_DOWNLOAD = gdown.download
# The subcaption gdown 6.5.1 extracts from Drive's quota page (download.py, get_url_from_gdrive_confirmation).
QUOTA_TEXT = ("Failed to retrieve file url:\n\n\tToo many users have viewed or downloaded this file recently. "
              "Please try accessing the file again later.")


def make_zip(files: dict[str, bytes], top: str | None = "VNBench_new") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        if top:
            archive.writestr(f"{top}/", b"")
        for name, data in files.items():
            archive.writestr(f"{top}/{name}" if top else name, data)
    return buffer.getvalue()


ZIP = make_zip(VIDEOS)


class FakeHub:
    def __init__(self, content: bytes = ANNOTATIONS):
        self.content = content
        self.calls = []

    def __call__(self, *args, **kwargs):
        bound = inspect.signature(REAL_HUB_DOWNLOAD).bind(*args, **kwargs).arguments
        self.calls.append(bound)
        assert bound["repo_type"] == "dataset"
        if bound.get("dry_run"):
            assert bound["revision"] == "main"  # the manifest pins none
            return SimpleNamespace(commit_hash=COMMIT)
        assert bound["revision"] == COMMIT  # downloads exactly the commit the dry run resolved
        target = Path(bound["local_dir"]) / bound["filename"]
        target.write_bytes(self.content)
        return str(target)


class FakeDrive:
    """gdown.download on local bytes, keeping an interrupted transfer as OUTPUT + 8 chars + '.part' like gdown."""

    def __init__(self, content: bytes = ZIP, interrupt_at: int | None = None, error: Exception | None = None):
        self.content = content
        self.interrupt_at = interrupt_at
        self.error = error
        self.calls = []
        self.resumed_from = None

    def __call__(self, *args, **kwargs):
        bound = inspect.signature(REAL_GDOWN_DOWNLOAD).bind(*args, **kwargs).arguments
        self.calls.append(bound)
        assert bound["id"] == "1KOUzy07viQzpmpcBqydUA043VQZ4nmRv" and bound.get("url") is None
        if self.error:
            raise self.error
        output = Path(bound["output"])
        parts = list(output.parent.glob(output.name + "*.part"))
        part = parts[0] if parts and bound["resume"] else output.with_name(output.name + "abcdefgh.part")
        start = part.stat().st_size if part.exists() else 0
        if start:
            self.resumed_from = start
        end = len(self.content)
        if self.interrupt_at is not None:
            end, self.interrupt_at = self.interrupt_at, None
        with open(part, "ab") as handle:
            handle.write(self.content[start:end])
        if end < len(self.content):
            raise DownloadError("Response ended before the announced number of bytes")
        shutil.move(part, output)
        return str(output)


def refuse(*args, **kwargs):
    raise AssertionError("the network must not be used")


@pytest.fixture
def manifest_path(tmp_path_factory):
    raw = yaml.safe_load(mf.MANIFEST_PATH.read_text())
    raw["artefacts"]["annotations"]["approx_size_bytes"] = len(ANNOTATIONS)
    raw["artefacts"]["videos"]["approx_size_bytes"] = len(ZIP)
    path = tmp_path_factory.mktemp("manifest") / "manifest.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fakes(monkeypatch, hub=None, drive=None):
    hub = hub or FakeHub()
    drive = drive or FakeDrive()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.setattr(gdown, "download", drive)
    return hub, drive


def assert_videos_unpacked(root: Path):
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(VIDEOS)
    for name, data in VIDEOS.items():
        assert (root / name).read_bytes() == data


def test_repo_manifest_names_the_published_sources():
    manifest = mf.load_manifest()
    assert manifest.annotations.repo_id == "videoniah/VNBench"
    assert manifest.annotations.filename == "VNBench-main-4try.json"
    assert manifest.annotations.revision is None and manifest.annotations.sha256 is None
    assert manifest.videos.file_id == "1KOUzy07viQzpmpcBqydUA043VQZ4nmRv"
    assert (manifest.videos.filename, manifest.videos.extract_to) == ("VNBench_new.zip", "VNBench_new")
    assert manifest.videos.approx_size_bytes == 10_900_000_000


@pytest.mark.parametrize("edit, key", [
    (lambda raw: raw["artefacts"]["videos"].pop("file_id"), "artefacts.videos.file_id"),
    (lambda raw: raw["artefacts"]["annotations"].update(sha256="abc"), "artefacts.annotations.sha256"),
    (lambda raw: raw["artefacts"]["videos"].update(approx_size_bytes="big"), "artefacts.videos.approx_size_bytes"),
    (lambda raw: raw["artefacts"].pop("annotations"), "artefacts.annotations"),
])
def test_bad_manifest_names_file_and_key(manifest_path, edit, key):
    raw = yaml.safe_load(manifest_path.read_text())
    edit(raw)
    manifest_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(mf.ManifestError) as err:
        mf.load_manifest(manifest_path)
    assert str(manifest_path) in str(err.value) and f"'{key}'" in str(err.value)
    with pytest.raises(mf.ManifestError, match="manifest not found"):
        mf.load_manifest(manifest_path.with_name("absent.yaml"))


def test_first_fetch_records_hashes_and_second_is_a_no_op(tmp_path, manifest_path, monkeypatch, capsys):
    hub, drive = fakes(monkeypatch)
    paths = mf.fetch("all", tmp_path / "data", manifest=manifest_path, quiet=True)
    assert paths["annotations"].read_bytes() == ANNOTATIONS
    assert_videos_unpacked(paths["videos"])
    assert [c.get("dry_run", False) for c in hub.calls] == [True, False] and len(drive.calls) == 1
    assert drive.calls[0]["resume"] is True

    record = json.loads((tmp_path / "data" / mf.INTEGRITY_FILE).read_text())
    assert record["annotations"]["sha256"] == hashlib.sha256(ANNOTATIONS).hexdigest()
    assert record["annotations"]["commit"] == COMMIT
    assert record["videos"]["zip_sha256"] == hashlib.sha256(ZIP).hexdigest()
    assert record["videos"]["members"] == {
        name: [len(data), zipfile.crc32(data)] for name, data in VIDEOS.items()}
    assert not list((tmp_path / "data").glob(".VNBench_new.*"))  # no temp folders left

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(gdown, "download", refuse)
    again = mf.fetch("all", tmp_path / "data", manifest=manifest_path)
    assert again == paths
    out = capsys.readouterr().out
    assert "sha256 matches the record" in out and "all 2 files match the record" in out


def test_zip_kept_on_drive_unpacked_once_per_vm(tmp_path, manifest_path, monkeypatch, capsys):
    """Colab: zip, annotations and record on Drive (downloaded once, ever); each new VM unpacks the zip to
    its own disk after checking the zip's sha256 against the record, with no download."""
    drive_data, vm = tmp_path / "drive" / "data" / "vnbench", tmp_path / "vm1"
    fakes(monkeypatch)
    paths = mf.fetch("all", drive_data, manifest=manifest_path, quiet=True, unpack_to=vm)
    assert paths["videos"] == vm / "VNBench_new" and paths["annotations"].parent == drive_data
    assert_videos_unpacked(paths["videos"])
    assert (drive_data / "VNBench_new.zip").read_bytes() == ZIP and not (drive_data / "VNBench_new").exists()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(gdown, "download", refuse)
    capsys.readouterr()
    assert mf.fetch("videos", drive_data, manifest=manifest_path, unpack_to=vm)["videos"] == vm / "VNBench_new"
    assert "all 2 files match the record" in capsys.readouterr().out  # same VM: nothing to do

    second_vm = tmp_path / "vm2"
    assert_videos_unpacked(mf.fetch("videos", drive_data, manifest=manifest_path, unpack_to=second_vm)["videos"])
    assert "2 files unpacked; zip sha256" in capsys.readouterr().out

    zip_bytes = bytearray(ZIP)
    zip_bytes[len(ZIP) // 2] ^= 0xFF  # a zip damaged on Drive is refused, not unpacked
    (drive_data / "VNBench_new.zip").write_bytes(bytes(zip_bytes))
    with pytest.raises(mf.ChecksumError, match="does not match the record"):
        mf.fetch("videos", drive_data, manifest=manifest_path, quiet=True, unpack_to=tmp_path / "vm3")
    assert not (tmp_path / "vm3" / "VNBench_new").exists()


def test_unfinished_until_the_whole_zip_is_recorded(tmp_path, manifest_path, monkeypatch):
    """What 03 and 04 check before they unpack: an interrupted fetch (annotations recorded, the zip not) is
    unfinished, so they refuse instead of starting the download themselves."""
    assert "no annotations recorded" in mf.unfinished(tmp_path, manifest_path)
    fakes(monkeypatch, drive=FakeDrive(interrupt_at=len(ZIP) // 2))
    with pytest.raises(mf.DownloadFailedError):
        mf.fetch("all", tmp_path, manifest=manifest_path, quiet=True)
    assert (tmp_path / mf.INTEGRITY_FILE).is_file()  # the annotations' entry
    assert "never downloaded and unpacked to the end" in mf.unfinished(tmp_path, manifest_path)
    mf.fetch("all", tmp_path, manifest=manifest_path, quiet=True)
    assert mf.unfinished(tmp_path, manifest_path) is None
    (tmp_path / "VNBench_new.zip").unlink()
    assert mf.unfinished(tmp_path, manifest_path).endswith("VNBench_new.zip is missing")


def test_cli_fetch_unpack_to(tmp_path, manifest_path, monkeypatch, capsys):
    fakes(monkeypatch)
    code = main(["data", "fetch", "videos", "--dest", str(tmp_path / "keep"), "--unpack-to", str(tmp_path / "fast"),
                 "--manifest", str(manifest_path), "--quiet"])
    assert code == 0 and f"videos: {tmp_path / 'fast' / 'VNBench_new'}" in capsys.readouterr().out


def test_interrupted_download_resumes(tmp_path, manifest_path, monkeypatch):
    _, drive = fakes(monkeypatch, drive=FakeDrive(interrupt_at=len(ZIP) // 2))
    with pytest.raises(mf.DownloadFailedError, match="re-run the same command to resume"):
        mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)
    assert [p.stat().st_size for p in tmp_path.glob("VNBench_new.zip*.part")] == [len(ZIP) // 2]
    assert not (tmp_path / "VNBench_new").exists()

    root = mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)["videos"]
    assert drive.resumed_from == len(ZIP) // 2 and drive.calls[-1]["resume"] is True
    assert_videos_unpacked(root)
    assert (tmp_path / "VNBench_new.zip").read_bytes() == ZIP


def test_changed_annotations_are_moved_aside(tmp_path, manifest_path, monkeypatch):
    hub, _ = fakes(monkeypatch)
    target = mf.fetch("annotations", tmp_path, manifest=manifest_path, quiet=True)["annotations"]
    target.write_bytes(b"[]")
    with pytest.raises(mf.ChecksumError, match="moved") as err:
        mf.fetch("annotations", tmp_path, manifest=manifest_path, quiet=True)
    assert "does not match the record" in str(err.value)
    assert not target.exists() and target.with_name(target.name + ".corrupt").read_bytes() == b"[]"

    hub.content = b"upstream changed"  # a fresh download that disagrees with the record is refused too
    with pytest.raises(mf.ChecksumError):
        mf.fetch("annotations", tmp_path, manifest=manifest_path, quiet=True)
    assert not target.exists()
    hub.content = ANNOTATIONS
    assert mf.fetch("annotations", tmp_path, manifest=manifest_path, quiet=True)["annotations"] == target
    assert target.read_bytes() == ANNOTATIONS


def test_zip_not_matching_the_manifest_hash_is_moved_aside(tmp_path, manifest_path, monkeypatch):
    raw = yaml.safe_load(manifest_path.read_text())
    raw["artefacts"]["videos"]["sha256"] = "0" * 64
    manifest_path.write_text(yaml.safe_dump(raw))
    fakes(monkeypatch)
    with pytest.raises(mf.ChecksumError, match="does not match the manifest"):
        mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)
    assert (tmp_path / "VNBench_new.zip.corrupt").read_bytes() == ZIP
    assert not (tmp_path / "VNBench_new.zip").exists() and not (tmp_path / "VNBench_new").exists()
    assert not (tmp_path / mf.INTEGRITY_FILE).exists()


def corrupt_member(data: bytes) -> bytes:
    start = data.index(VIDEOS["ret_edit1_a.mp4"][:64])
    return data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1:]


@pytest.mark.parametrize("bad_zip", [ZIP[: len(ZIP) // 2], corrupt_member(ZIP)], ids=["truncated", "bad-crc"])
def test_corrupt_zip_is_kept_aside_and_nothing_is_unpacked(tmp_path, manifest_path, monkeypatch, bad_zip):
    fakes(monkeypatch, drive=FakeDrive(content=bad_zip))
    with pytest.raises(mf.CorruptArchiveError, match="truncated or corrupt"):
        mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)
    assert (tmp_path / "VNBench_new.zip.corrupt").read_bytes() == bad_zip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VNBench_new.zip.corrupt"]


def test_drive_quota_message_then_a_hand_copied_zip_is_used(tmp_path, manifest_path, monkeypatch):
    fakes(monkeypatch, drive=FakeDrive(error=FileURLRetrievalError(QUOTA_TEXT)))
    with pytest.raises(mf.DriveRefusedError) as err:
        mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)
    message = str(err.value)
    assert "Too many users" in message and "Retry later" in message
    assert str(tmp_path / "VNBench_new.zip") in message  # where to copy the zip by hand

    (tmp_path / "VNBench_new.zip").write_bytes(ZIP)
    monkeypatch.setattr(gdown, "download", refuse)
    assert_videos_unpacked(mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)["videos"])
    assert mf.read_integrity(tmp_path)["videos"]["zip_sha256"] == hashlib.sha256(ZIP).hexdigest()


def test_not_enough_disk_space(tmp_path, manifest_path, monkeypatch):
    _, drive = fakes(monkeypatch)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mf.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(mf.DiskSpaceError) as err:
        mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)
    assert f"need {2 * len(ZIP) / 1e9:.2f} GB, 0.00 GB free" in str(err.value)
    assert drive.calls == []


def test_unpack_needs_space_for_the_members(tmp_path, manifest_path, monkeypatch):
    (tmp_path / "VNBench_new.zip").write_bytes(ZIP)
    fakes(monkeypatch, drive=refuse)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mf.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 7999, 7999))
    with pytest.raises(mf.DiskSpaceError, match="unpacking VNBench_new.zip"):
        mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)
    assert (tmp_path / "VNBench_new.zip").exists() and not (tmp_path / "VNBench_new").exists()


def test_incomplete_tree_is_rebuilt_from_the_zip(tmp_path, manifest_path, monkeypatch):
    fakes(monkeypatch)
    root = mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)["videos"]
    (root / "sub" / "cnt_insert1_b.mp4").unlink()
    monkeypatch.setattr(gdown, "download", refuse)
    mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)
    assert_videos_unpacked(root)
    assert not list(tmp_path.glob(".VNBench_new*"))


def test_zip_without_top_folder_unpacks_into_extract_to(tmp_path, manifest_path, monkeypatch):
    fakes(monkeypatch, drive=FakeDrive(content=make_zip(VIDEOS, top=None)))
    root = mf.fetch("videos", tmp_path, manifest=manifest_path, quiet=True)["videos"]
    assert_videos_unpacked(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o755  # the temp folder renamed into place, not left 0700


def test_verify_report(tmp_path, manifest_path, monkeypatch):
    report = mf.verify(tmp_path, manifest=manifest_path)
    assert [(c.item, c.status) for c in report.checks] == [
        ("VNBench-main-4try.json", "missing"), ("VNBench_new.zip", "missing"), ("VNBench_new/", "missing")]
    assert not report.ok

    fakes(monkeypatch)
    mf.fetch("all", tmp_path, manifest=manifest_path, quiet=True)
    for deep in (False, True):
        report = mf.verify(tmp_path, manifest=manifest_path, deep=deep)
        assert report.ok and [c.status for c in report.checks] == ["ok"] * 3
    assert "sha256 matches the record" in str(report) and "sizes and CRC-32 match" in str(report)

    (tmp_path / "VNBench_new.zip").unlink()  # allowed once unpacked
    report = mf.verify(tmp_path, manifest=manifest_path)
    assert report.ok and report.checks[1].status == "absent"

    root = tmp_path / "VNBench_new"
    same_size = bytes(len(VIDEOS["ret_edit1_a.mp4"]))
    (root / "ret_edit1_a.mp4").write_bytes(same_size)
    assert mf.verify(tmp_path, manifest=manifest_path).ok  # sizes only: a same-size change passes
    report = mf.verify(tmp_path, manifest=manifest_path, deep=True)
    assert report.checks[2].status == "wrong" and "ret_edit1_a.mp4: CRC-32 differs" in report.checks[2].detail

    (root / "sub" / "cnt_insert1_b.mp4").unlink()
    (tmp_path / "VNBench-main-4try.json").write_bytes(b"{}")
    report = mf.verify(tmp_path, manifest=manifest_path)
    assert [c.status for c in report.problems] == ["wrong", "missing", "wrong"]  # the zip is needed again
    assert "missing sub/cnt_insert1_b.mp4" in report.checks[2].detail
    assert "3 problem(s)" in str(report)


def test_verify_without_record_says_unrecorded(tmp_path, manifest_path):
    (tmp_path / "VNBench-main-4try.json").write_bytes(ANNOTATIONS)
    (tmp_path / "VNBench_new").mkdir()
    report = mf.verify(tmp_path, manifest=manifest_path)
    assert [c.status for c in report.checks] == ["unrecorded", "missing", "unrecorded"]
    assert hashlib.sha256(ANNOTATIONS).hexdigest() in report.checks[0].detail


def test_cli_fetch_and_verify(tmp_path, manifest_path, monkeypatch, capsys):
    dest = str(tmp_path / "data")
    common = ["--dest", dest, "--manifest", str(manifest_path), "--quiet"]
    fakes(monkeypatch, drive=FakeDrive(error=FileURLRetrievalError(QUOTA_TEXT)))
    assert main(["data", "fetch", "videos", *common]) == 1
    assert "duokit data fetch: Google Drive refused" in capsys.readouterr().err

    fakes(monkeypatch)
    assert main(["data", "fetch", *common]) == 0
    assert f"videos: {dest}/VNBench_new" in capsys.readouterr().out
    assert main(["data", "verify", "--deep", *common]) == 0
    assert "all present and verified" in capsys.readouterr().out

    (tmp_path / "data" / "VNBench_new" / "ret_edit1_a.mp4").unlink()
    assert main(["data", "verify", "videos", *common]) == 1
    out = capsys.readouterr().out
    assert "missing ret_edit1_a.mp4" in out and "annotations" not in out


def test_unreadable_integrity_record_is_one_clear_error(tmp_path, manifest_path, monkeypatch, capsys):
    (tmp_path / mf.INTEGRITY_FILE).write_text('{"annotations": ')
    fakes(monkeypatch, hub=refuse, drive=refuse)
    with pytest.raises(mf.DataError, match="not valid JSON.*deleting it"):
        mf.fetch("annotations", tmp_path, manifest=manifest_path, quiet=True)
    assert main(["data", "verify", "--dest", str(tmp_path), "--manifest", str(manifest_path)]) == 1
    assert f"{tmp_path / mf.INTEGRITY_FILE}: not valid JSON" in capsys.readouterr().err
