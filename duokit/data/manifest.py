"""Artefacts named in `data_manifest.yaml`: fetch them (huggingface_hub, gdown) and verify them.

Where the manifest publishes no sha256, the first download records the observed one in
`DEST/.duokit-integrity.json` (with the resolved Hub commit, and the zip's member list for the
videos); every later fetch or verify checks against that record. A file that fails its check is
moved aside to `NAME.corrupt` and never used. Sources: the VideoNIAH README
(https://github.com/joez17/VideoNIAH) and https://huggingface.co/datasets/videoniah/VNBench.

The videos' zip can stay in one folder while its tree is unpacked into another (`unpack_to`): on Colab the
zip and the record live on Drive (downloaded once, ever) and each new VM unpacks them to its own fast disk,
after checking the zip's sha256 against the record (docs/colab.md, "Data on Drive").
"""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from duokit.io import atomic_write_json, read_json

MANIFEST_PATH = Path(__file__).resolve().with_name("data_manifest.yaml")
DEFAULT_DEST = Path("data/vnbench")
INTEGRITY_FILE = ".duokit-integrity.json"
ARTEFACTS = ("annotations", "videos")
CHUNK_BYTES = 1 << 20
# Hashing smaller files takes well under a second: no progress bar for them.
PROGRESS_MIN_BYTES = 64 << 20
# Statuses in a verify report; only these two make it fail.
FAILING = ("missing", "wrong")


class DataError(RuntimeError):
    """A fetch or verify problem, with a message that says what to do."""


class ManifestError(DataError):
    pass


class ChecksumError(DataError):
    pass


class CorruptArchiveError(DataError):
    pass


class DiskSpaceError(DataError):
    pass


class DriveRefusedError(DataError):
    pass


class DownloadFailedError(DataError):
    pass


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face Hub repository."""

    name: str
    repo_id: str
    repo_type: str
    filename: str
    revision: str | None
    approx_size_bytes: int
    sha256: str | None


@dataclass(frozen=True)
class DriveZip:
    """A zip on Google Drive, unpacked into DEST/extract_to."""

    name: str
    file_id: str
    filename: str
    extract_to: str
    approx_size_bytes: int
    sha256: str | None


@dataclass(frozen=True)
class Manifest:
    path: Path
    annotations: HubFile
    videos: DriveZip


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and validate the manifest; a bad file raises one ManifestError naming the file and key."""
    import yaml

    path = Path(path) if path is not None else MANIFEST_PATH
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found; pass --manifest PATH (one ships in duokit/data/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML ({err})") from err
    artefacts = _section(raw, "artefacts", path, "") if isinstance(raw, dict) else None
    if artefacts is None:
        raise ManifestError(f"{path}: expected a mapping with key 'artefacts'")
    annotations = _section(artefacts, "annotations", path, "artefacts.")
    videos = _section(artefacts, "videos", path, "artefacts.")

    def get(section: dict, key: str, kind: type, where: str, optional: bool = False):
        value = section.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = f"{kind.__name__}{' or null' if optional else ''}"
            raise ManifestError(f"{path}: key '{where}.{key}' must be a {expected}, got {value!r}")
        return value

    where = "artefacts.annotations"
    if get(annotations, "source", str, where) != "huggingface":
        raise ManifestError(f"{path}: key '{where}.source' must be 'huggingface'")
    hub = HubFile(
        name="annotations",
        repo_id=get(annotations, "repo_id", str, where),
        repo_type=get(annotations, "repo_type", str, where),
        filename=get(annotations, "filename", str, where),
        revision=get(annotations, "revision", str, where, optional=True),
        approx_size_bytes=get(annotations, "approx_size_bytes", int, where),
        sha256=_sha256_field(get(annotations, "sha256", str, where, optional=True), path, where),
    )
    where = "artefacts.videos"
    if get(videos, "source", str, where) != "google_drive":
        raise ManifestError(f"{path}: key '{where}.source' must be 'google_drive'")
    drive = DriveZip(
        name="videos",
        file_id=get(videos, "file_id", str, where),
        filename=get(videos, "filename", str, where),
        extract_to=get(videos, "extract_to", str, where),
        approx_size_bytes=get(videos, "approx_size_bytes", int, where),
        sha256=_sha256_field(get(videos, "sha256", str, where, optional=True), path, where),
    )
    return Manifest(path=path, annotations=hub, videos=drive)


def _section(parent: dict, key: str, path: Path, prefix: str) -> dict:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: key '{prefix}{key}' must be a mapping, got {value!r}")
    return value


def _sha256_field(value: str | None, path: Path, where: str) -> str | None:
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
        raise ManifestError(f"{path}: key '{where}.sha256' must be 64 hex digits or null, got {value!r}")
    return value.lower() if value else None


# --- integrity record -------------------------------------------------------------------------


def read_integrity(dest: str | os.PathLike) -> dict:
    path = Path(dest) / INTEGRITY_FILE
    if not path.is_file():
        return {}
    try:
        record = read_json(path)
    except ValueError as err:
        raise DataError(f"{err}; deleting it makes the next fetch record the hashes afresh") from err
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object; delete it and re-run `duokit data fetch`")
    return record


def _record(dest: Path, name: str, entry: dict) -> None:
    record = read_integrity(dest)
    record[name] = {**entry, "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    atomic_write_json(dest / INTEGRITY_FILE, record)


def sha256_of(path: Path, quiet: bool = True) -> str:
    from tqdm.auto import tqdm

    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
        disable=quiet or size < PROGRESS_MIN_BYTES,
    ) as bar:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _move_aside(path: Path) -> Path:
    """Rename a bad file to NAME.corrupt (replacing an older one) so it is kept but never used."""
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    return aside


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _ensure_free_space(folder: Path, need_bytes: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise DiskSpaceError(
            f"not enough disk space in {folder} for {what}: need {_gigabytes(need_bytes)}, "
            f"{_gigabytes(free)} free. Free up {_gigabytes(need_bytes - free)} or choose another --dest "
            "(on Colab the local disk under /content has more room than Drive)."
        )


def _checked(path: Path, expected: str | None, origin: str, quiet: bool) -> str:
    """Hash `path`; on a mismatch move it aside and raise."""
    observed = sha256_of(path, quiet)
    if expected and observed != expected:
        aside = _move_aside(path)
        raise ChecksumError(
            f"{path.name}: sha256 {observed} does not match the {origin} ({expected}); the file was moved "
            f"to {aside} and will not be used. Re-run `duokit data fetch` to download it again. If the upstream "
            f"file changed on purpose, delete its entry in {path.parent / INTEGRITY_FILE} to record the new one."
        )
    return observed


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message)


# --- fetch ------------------------------------------------------------------------------------


def fetch(
    which: str = "all",
    dest: str | os.PathLike = DEFAULT_DEST,
    manifest: Manifest | str | os.PathLike | None = None,
    quiet: bool = False,
    unpack_to: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Download, check and unpack the artefacts; a no-op for those already present and verified.

    Everything is downloaded into `dest`; the videos are unpacked into `unpack_to` (default `dest`).
    Returns {"annotations": path of the JSON file, "videos": the unpacked folder} for those asked for.
    """
    if which not in (*ARTEFACTS, "all"):
        raise ValueError(f"which must be one of {ARTEFACTS + ('all',)}, got {which!r}")
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    if which in ("annotations", "all"):
        paths["annotations"] = fetch_annotations(manifest.annotations, dest, quiet)
    if which in ("videos", "all"):
        paths["videos"] = fetch_videos(manifest.videos, dest, quiet, unpack_to)
    return paths


def unfinished(dest: str | os.PathLike = DEFAULT_DEST, manifest: Manifest | str | os.PathLike | None = None) -> str | None:
    """Why `fetch("all", dest)` has not yet finished in `dest` (None once it has), from its integrity record:
    the zip's sha256 is recorded only after the whole zip was downloaded, checked and unpacked, and the
    zip must still be there for a new VM to unpack. A caller that must not download (notebooks 03 and 04)
    refuses on this instead of letting `fetch` start the ~11 GB download."""
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    dest = Path(dest)
    record = read_integrity(dest)
    if not record.get(manifest.annotations.name, {}).get("sha256"):
        return f"no annotations recorded in {dest / INTEGRITY_FILE}"
    if not record.get(manifest.videos.name, {}).get("zip_sha256"):
        return (f"the videos were never downloaded and unpacked to the end ({manifest.videos.filename} has no "
                f"record in {dest / INTEGRITY_FILE}: an interrupted fetch?)")
    if not (dest / manifest.videos.filename).is_file():
        return f"{dest / manifest.videos.filename} is missing"
    return None


def fetch_annotations(artefact: HubFile, dest: Path, quiet: bool = False) -> Path:
    target = dest / artefact.filename
    recorded = read_integrity(dest).get(artefact.name, {})
    expected = artefact.sha256 or recorded.get("sha256")
    origin = "manifest" if artefact.sha256 else f"record in {INTEGRITY_FILE}"
    if target.is_file():
        observed = _checked(target, expected, origin, quiet)
        if expected:
            _say(f"{target}: present, sha256 matches the {origin}", quiet)
            return target
        _record(dest, artefact.name, {"file": artefact.filename, "size": target.stat().st_size,
                                      "sha256": observed, "source": "found in place (not downloaded)"})
        _say(f"{target}: present; recorded its sha256 {observed} in {dest / INTEGRITY_FILE}", quiet)
        return target

    import huggingface_hub

    _ensure_free_space(dest, artefact.approx_size_bytes, artefact.filename)
    where = f"{artefact.repo_id} ({artefact.repo_type})"
    try:
        # Resolve the revision first so that exactly this commit is downloaded and recorded.
        info = huggingface_hub.hf_hub_download(
            artefact.repo_id, artefact.filename, repo_type=artefact.repo_type,
            revision=artefact.revision or "main", local_dir=dest, dry_run=True,
        )
        downloaded = huggingface_hub.hf_hub_download(
            artefact.repo_id, artefact.filename, repo_type=artefact.repo_type,
            revision=info.commit_hash, local_dir=dest,
        )
    except Exception as err:  # network, auth, offline mode: all end the same way for the user
        raise DownloadFailedError(
            f"could not download {artefact.filename} from the Hugging Face Hub dataset {where}: "
            f"{type(err).__name__}: {err}. Check the connection (and that HF_HUB_OFFLINE is unset), or copy "
            f"the file to {target} by hand and re-run."
        ) from err
    downloaded = Path(downloaded)
    observed = _checked(downloaded, expected, origin, quiet)
    _record(dest, artefact.name, {
        "file": artefact.filename, "size": downloaded.stat().st_size, "sha256": observed,
        "source": f"huggingface {where}", "revision": artefact.revision, "commit": info.commit_hash,
    })
    _say(f"{downloaded}: downloaded from {where} at commit {info.commit_hash}; sha256 {observed} "
         f"{'matches the ' + origin if expected else 'recorded in ' + str(dest / INTEGRITY_FILE)}", quiet)
    return downloaded


def _partial_bytes(dest: Path, filename: str) -> int:
    # gdown keeps an interrupted download as FILENAME + 8 random characters + ".part" beside the output.
    return sum(p.stat().st_size for p in dest.glob(f"{filename}*.part") if p.is_file())


def fetch_videos(artefact: DriveZip, dest: Path, quiet: bool = False,
                 unpack_to: str | os.PathLike | None = None) -> Path:
    unpack_to = Path(unpack_to) if unpack_to is not None else dest
    root = unpack_to / artefact.extract_to
    zip_path = dest / artefact.filename
    recorded = read_integrity(dest).get(artefact.name, {})
    members = recorded.get("members")
    if root.is_dir() and members and not tree_problems(root, members):
        _say(f"{root}: present, all {len(members)} files match the record", quiet)
        return root
    if root.exists():
        _say(f"{root}: incomplete or not recorded; it will be replaced from the zip", quiet)

    if not zip_path.is_file():
        # Videos are already compressed, so the unpacked tree is about as large as the zip.
        copies = 2 if unpack_to.resolve() == dest.resolve() else 1
        need = copies * artefact.approx_size_bytes - _partial_bytes(dest, artefact.filename)
        _ensure_free_space(dest, need, f"{artefact.filename} and its unpacked {artefact.extract_to}/")
        _download_from_drive(artefact, zip_path, quiet)

    expected = artefact.sha256 or recorded.get("zip_sha256")
    origin = "manifest" if artefact.sha256 else f"record in {INTEGRITY_FILE}"
    observed = _checked(zip_path, expected, origin, quiet)
    members = _extract(zip_path, root, quiet)
    _record(dest, artefact.name, {
        "zip": artefact.filename, "zip_size": zip_path.stat().st_size, "zip_sha256": observed,
        "source": f"google_drive {artefact.file_id}", "extract_to": artefact.extract_to, "members": members,
    })
    _say(f"{root}: {len(members)} files unpacked; zip sha256 {observed} "
         f"{'matches the ' + origin if expected else 'recorded in ' + str(dest / INTEGRITY_FILE)}", quiet)
    return root


def _download_from_drive(artefact: DriveZip, zip_path: Path, quiet: bool) -> None:
    import gdown
    from gdown.exceptions import FileURLRetrievalError

    manual = (f"download https://drive.google.com/file/d/{artefact.file_id} in a browser, copy it to "
              f"{zip_path} and re-run the same command")
    try:
        # `id=` works on gdown 5.x and 6.x; `fuzzy=` is a TypeError on 6.x (https://github.com/wkentaro/gdown).
        output = gdown.download(id=artefact.file_id, output=str(zip_path), quiet=quiet, resume=True)
    except FileURLRetrievalError as err:
        raise DriveRefusedError(
            f"Google Drive refused to hand out {artefact.filename} (id {artefact.file_id}). This is usually "
            "the download quota ('Too many users have viewed or downloaded this file recently'), which "
            f"resets within 24 hours. Retry later, or {manual}.\ngdown said: {str(err).strip()}"
        ) from err
    except Exception as err:  # dropped connection and the like; gdown keeps the bytes received
        raise DownloadFailedError(
            f"the download of {artefact.filename} stopped: {type(err).__name__}: {err}. The bytes received "
            f"so far are kept beside it ({artefact.filename}*.part); re-run the same command to resume, or {manual}."
        ) from err
    if output is None or not zip_path.is_file():  # gdown < 5 returned None instead of raising
        raise DownloadFailedError(f"gdown did not produce {zip_path}; retry later, or {manual}.")


def _extract(zip_path: Path, root: Path, quiet: bool) -> dict[str, list[int]]:
    """Unpack into a temp folder beside `root`, then rename it into place; returns {name: [size, crc32]}."""
    from tqdm.auto import tqdm

    prefix = root.name + "/"
    tmp = None
    try:
        with zipfile.ZipFile(zip_path) as archive:
            files = [i for i in archive.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
            if not files:
                raise zipfile.BadZipFile("the archive holds no files")
            nested = all(i.filename.startswith(prefix) for i in files)
            total = sum(i.file_size for i in files)
            _ensure_free_space(root.parent, total, f"unpacking {zip_path.name}")
            for stale in root.parent.glob(f".{root.name}.extract-*"):
                shutil.rmtree(stale)  # left by an interrupted earlier run
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.extract-", dir=root.parent))
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"unpack {zip_path.name}",
                      disable=quiet) as bar:
                for info in files:
                    archive.extract(info, tmp)  # sanitises names; raises BadZipFile on a CRC mismatch
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        aside = _move_aside(zip_path)
        raise CorruptArchiveError(
            f"{zip_path.name} is truncated or corrupt ({err}); it was moved to {aside} and will not be used. "
            "Re-run `duokit data fetch videos` to download it again."
        ) from err
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    unpacked = tmp / root.name if nested else tmp
    os.chmod(unpacked, 0o755)  # mkdtemp creates 0700; the data folder is an ordinary shared folder
    if root.exists():  # an earlier incomplete tree: the zip can always rebuild it
        old = root.with_name(f".{root.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(root, old)
        os.replace(unpacked, root)
        shutil.rmtree(old)
    else:
        os.replace(unpacked, root)
    if nested:
        shutil.rmtree(tmp)
    strip = len(prefix) if nested else 0
    return {i.filename[strip:]: [i.file_size, i.CRC] for i in files}


# --- verify -----------------------------------------------------------------------------------


def tree_problems(root: Path, members: dict[str, list[int]], deep: bool = False,
                  quiet: bool = True) -> list[str]:
    """What differs between the unpacked tree and the recorded member list (sizes; CRC-32 when deep)."""
    from tqdm.auto import tqdm

    problems = []
    total = sum(size for size, _ in members.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"crc32 {root.name}/",
              disable=quiet or not deep or total < PROGRESS_MIN_BYTES) as bar:
        for name, (size, crc) in members.items():
            path = root / name
            if not path.is_file():
                problems.append(f"missing {name}")
            elif path.stat().st_size != size:
                problems.append(f"{name}: {path.stat().st_size} bytes, expected {size}")
            elif deep and _crc32_of(path) != crc:
                problems.append(f"{name}: CRC-32 differs from the zip's")
            bar.update(size)
    return problems


@dataclass(frozen=True)
class Check:
    artefact: str
    item: str
    status: str  # ok | missing | wrong | unrecorded | absent
    detail: str


@dataclass
class VerifyReport:
    dest: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status in FAILING]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"{self.dest}:"]
        lines += [f"  {c.status:<10} {c.artefact:<11} {c.item}: {c.detail}" for c in self.checks]
        lines.append("all present and verified" if self.ok else
                     f"{len(self.problems)} problem(s); run `duokit data fetch --dest {self.dest}` to repair")
        return "\n".join(lines)


def verify(
    dest: str | os.PathLike = DEFAULT_DEST,
    which: str = "all",
    manifest: Manifest | str | os.PathLike | None = None,
    deep: bool = False,
    quiet: bool = True,
) -> VerifyReport:
    """Check what is present, missing or wrong; never changes a file.

    Always: presence, sizes, the annotations' sha256 and the unpacked videos against the recorded member
    list. `deep=True` also hashes the zip (sha256) and every unpacked video (CRC-32), i.e. reads ~22 GB.
    """
    if which not in (*ARTEFACTS, "all"):
        raise ValueError(f"which must be one of {ARTEFACTS + ('all',)}, got {which!r}")
    manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    dest = Path(dest)
    report = VerifyReport(dest)
    record = read_integrity(dest)
    if which in ("annotations", "all"):
        report.checks.append(_verify_file(
            dest / manifest.annotations.filename, "annotations", manifest.annotations.sha256,
            record.get("annotations", {}), "sha256", "size", hash_it=True, quiet=quiet))
    if which in ("videos", "all"):
        videos = manifest.videos
        recorded = record.get("videos", {})
        tree = _verify_tree(dest / videos.extract_to, recorded.get("members"), deep, quiet)
        zip_check = _verify_file(dest / videos.filename, "videos", videos.sha256, recorded, "zip_sha256",
                                 "zip_size", hash_it=deep, quiet=quiet)
        if zip_check.status == "missing" and tree.status == "ok":
            zip_check = Check("videos", videos.filename, "absent", f"not needed: {videos.extract_to}/ is complete")
        report.checks += [zip_check, tree]
    return report


def _verify_file(path: Path, artefact: str, manifest_sha: str | None, recorded: dict, sha_key: str,
                 size_key: str, hash_it: bool, quiet: bool) -> Check:
    if not path.is_file():
        return Check(artefact, path.name, "missing", f"run `duokit data fetch {artefact}`")
    size = path.stat().st_size
    expected = manifest_sha or recorded.get(sha_key)
    origin = "manifest" if manifest_sha else "record"
    if recorded.get(size_key) is not None and recorded[size_key] != size:
        return Check(artefact, path.name, "wrong", f"{size} bytes, the record says {recorded[size_key]}")
    if not hash_it:
        if recorded.get(size_key) is None:
            return Check(artefact, path.name, "unrecorded",
                         f"{size} bytes; no record to compare with yet: run `duokit data fetch {artefact}`")
        return Check(artefact, path.name, "ok", f"{size} bytes, size matches the record (sha256: use --deep)")
    observed = sha256_of(path, quiet)
    if not expected:
        return Check(artefact, path.name, "unrecorded",
                     f"{size} bytes, sha256 {observed}; nothing to compare with yet: run `duokit data fetch`")
    if observed != expected:
        return Check(artefact, path.name, "wrong", f"sha256 {observed} differs from the {origin} ({expected})")
    return Check(artefact, path.name, "ok", f"{size} bytes, sha256 matches the {origin}")


def _verify_tree(root: Path, members: dict | None, deep: bool, quiet: bool) -> Check:
    item = root.name + "/"
    if not root.is_dir():
        return Check("videos", item, "missing", "run `duokit data fetch videos`")
    if not members:
        count = sum(1 for p in root.rglob("*") if p.is_file())
        return Check("videos", item, "unrecorded",
                     f"{count} files but no member list to check them against: run `duokit data fetch videos`")
    problems = tree_problems(root, members, deep, quiet)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        return Check("videos", item, "wrong", f"{len(problems)} of {len(members)} files differ: {shown}")
    checked = "sizes and CRC-32" if deep else "sizes"
    return Check("videos", item, "ok", f"all {len(members)} files present, {checked} match the record")
