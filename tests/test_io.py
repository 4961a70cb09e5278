"""duokit.io: atomic writes keep the old file on failure; the JSONL log resumes after a torn append."""

from __future__ import annotations

import json
import stat

import pytest

from duokit.io import JsonlLog, atomic_output, atomic_write_json, atomic_write_text, iter_jsonl, read_json


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert read_json(path) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError, match="died"), atomic_output(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_read_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_iter_jsonl_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": ')
    assert list(iter_jsonl(path)) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl, line 2: not valid JSON"):
        list(iter_jsonl(path))


def test_jsonl_log_resumes_after_a_torn_append(tmp_path):
    path = tmp_path / "runs" / "log.jsonl"
    log = JsonlLog(path, key="id")
    log.append({"id": 1, "v": "a"})
    log.append({"id": "2", "v": "b"})
    with pytest.raises(ValueError, match="already logged"):
        log.append({"id": "1"})  # keys compare as strings
    with pytest.raises(ValueError, match="no key field 'id'"):
        log.append({"v": "c"})
    with open(path, "a") as handle:
        handle.write('{"id": 3, "v"')  # the process died mid-append

    resumed = JsonlLog(path, key="id")
    assert len(resumed) == 2 and 1 in resumed and "2" in resumed and 3 not in resumed
    resumed.append({"id": 3, "v": "c"})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [1, "2", 3]


def test_jsonl_log_drops_records_to_make_again(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(path, key="id")
    for key, value in ((1, 0.1), (2, None), (3, 1e-7)):
        log.append({"id": key, "v": value, "text": "é"})
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert log.drop(lambda r: r["v"] is None) == [{"id": 2, "v": None, "text": "é"}]
    assert path.read_text(encoding="utf-8").splitlines(keepends=True) == [lines[0], lines[2]]  # kept as written
    assert 2 not in log and len(log) == 2 and 2 not in JsonlLog(path, key="id")
    log.append({"id": 2, "v": 0.2})  # made again
    assert log.drop(lambda r: False) == [] and len(JsonlLog(path, key="id")) == 3


def test_copy_folder_replaces_the_whole_folder(tmp_path):
    from duokit.io import copy_folder

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.tsv").write_text("1\t0\n")
    (src / "sub" / "b.json").write_text("{}")
    dest = tmp_path / "out" / "pattern"
    assert copy_folder(src, dest) == dest
    (src / "a.tsv").write_text("0\t1\n")
    (dest / "stale.txt").write_text("from an older copy")
    copy_folder(src, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["a.tsv", "sub", "sub/b.json"]
    assert (dest / "a.tsv").read_text() == "0\t1\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["pattern"]  # no temp or old folder left
    with pytest.raises(FileNotFoundError, match="missing: not a folder"):
        copy_folder(tmp_path / "missing", dest)
    assert (dest / "a.tsv").is_file()
