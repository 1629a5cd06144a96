"""The offline demo: the synthetic photo generator and the fault-injecting HTTP server.

Everything is small (5 landmarks x 4 views, 6 non-landmarks) and every network call goes to
127.0.0.1 with a short timeout, so the file runs in seconds.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from PIL import Image, ImageOps

from landmarks.common import StageError
from landmarks.demo.__main__ import main
from landmarks.demo.files import EXIF_ORIENTATION_TAG, encode
from landmarks.demo.generate import generate
from landmarks.demo.scenes import STRUCTURE_FAMILIES, landmark_specs
from landmarks.demo.server import (
    FAULT_KINDS,
    DemoServer,
    corrupt_jpeg,
    process_alive,
    start_server_process,
    stop_server_process,
)

SMALL = dict(seed=7, n_landmarks=5, views_per_landmark=4, n_nonlandmarks=6, broken_fraction=0.3)
# The same set as config.yaml's demo section (what the workflow passes as --settings).
SMALL_SETTINGS = {"seed": 7, "landmarks": 5, "views_per_landmark": 4, "nonlandmarks": 6, "broken_fraction": 0.3}
N_ROWS = 5 * 4 + 6
N_NEW = 8 + 4  # the default new photos for `predict`: 8 landmark views (5 landmarks in turn), 4 others
BASE_URL = "http://127.0.0.1:8765"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    counts = generate(out, workers=1, **SMALL)
    return out, counts


@pytest.fixture(scope="module")
def server(demo_set):
    root, _ = demo_set
    with DemoServer(root, slow_seconds=5) as srv:
        yield srv


def read_rows(root: Path) -> list[dict]:
    with open(root / "urls.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def read_faults(root: Path) -> dict[str, str]:
    with open(root / "faults.csv", newline="") as fh:
        return {row["id"]: row["fault"] for row in csv.DictReader(fh)}


def local_url(srv: DemoServer, url: str) -> str:
    """The URL on the test server (it listens on a free port, not the default 8765)."""
    assert url.startswith(BASE_URL)
    return srv.base_url + url[len(BASE_URL) :]


def file_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def raw_get(port: int, path: str) -> tuple[int, dict, bytes]:
    """GET a path exactly as written (urllib and aiohttp clients would normalise '..')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def test_same_arguments_give_identical_bytes(demo_set, tmp_path):
    root, _ = demo_set
    again = tmp_path / "again"
    generate(again, workers=2, **SMALL)  # other process count, same bytes
    first, second = tree_hashes(root), tree_hashes(again)
    # images + urls.csv, faults.csv, demo.json; the new photos + new_photos.csv
    assert len(first) == N_ROWS + 3 + N_NEW + 1
    assert sum(name.startswith("new_photos/") for name in first) == N_NEW
    assert first == second


def test_other_seed_gives_other_photos(demo_set, tmp_path):
    root, _ = demo_set
    other = tmp_path / "other"
    generate(other, workers=1, **{**SMALL, "seed": 8})
    assert not set(tree_hashes(root).values()) & set(tree_hashes(other).values())


def test_counts_and_urls_csv_format(demo_set):
    root, counts = demo_set
    assert counts["images"] == N_ROWS
    assert counts["landmark_images"] == 20 and counts["nonlandmark_images"] == 6
    with open(root / "urls.csv", newline="") as fh:
        assert fh.readline().strip() == "id,url,landmark_id"
    rows = read_rows(root)
    assert len(rows) == N_ROWS
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == N_ROWS
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    url_pattern = re.compile(re.escape(BASE_URL) + r"/(images|fault/[a-z_]+)/([0-9a-f]{16})\.(jpg|png)$")
    for row in rows:
        match = url_pattern.match(row["url"])
        assert match, row["url"]
        assert match.group(2) == row["id"]
    labels = [row["landmark_id"] for row in rows]
    assert labels.count("") == 6  # non-landmarks have an empty landmark_id
    landmark_labels = [int(label) for label in labels if label]
    assert len(set(landmark_labels)) == 5
    assert all(landmark_labels.count(label) == 4 for label in set(landmark_labels))
    # urls.csv is written last: nothing it names is missing.
    assert all((root / "images" / file_of(row["url"])).is_file() for row in rows)
    meta = json.loads((root / "demo.json").read_text())
    assert meta["arguments"]["seed"] == 7 and meta["counts"]["images"] == N_ROWS


def test_broken_links_cover_every_fault_kind(demo_set):
    root, counts = demo_set
    rows = {row["id"]: row for row in read_rows(root)}
    faults = read_faults(root)
    # round(0.3 * 20) landmark rows + round(0.3 * 6) non-landmark rows
    assert len(faults) == counts["broken"] == 6 + 2
    assert set(faults.values()) == set(FAULT_KINDS)
    assert any(rows[i]["landmark_id"] for i in faults) and any(not rows[i]["landmark_id"] for i in faults)
    for image_id, row in rows.items():
        if image_id in faults:
            assert f"/fault/{faults[image_id]}/" in row["url"]
        else:
            assert "/images/" in row["url"]


def test_every_file_variant_is_present(demo_set):
    root, _ = demo_set
    faults = read_faults(root)
    seen, aspects = set(), set()
    for row in read_rows(root):
        path = root / "images" / file_of(row["url"])
        with Image.open(path) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG)
            assert (image.format == "PNG") == path.name.endswith(".png")
            upright = ImageOps.exif_transpose(image)
            assert 200 <= max(upright.size) <= 900
            aspects.add(round(upright.size[0] / upright.size[1], 1))
            if row["id"] not in faults:
                seen.add((image.format, image.mode, orientation))
            image.load()
    assert ("PNG", "RGB", None) in seen
    assert ("PNG", "RGBA", None) in seen
    assert ("JPEG", "L", None) in seen
    assert ("JPEG", "CMYK", None) in seen
    assert ("JPEG", "RGB", None) in seen
    assert {o for _, _, o in seen if o} == {3, 6, 8}
    assert len(aspects) >= 3


@pytest.mark.parametrize("variant", ["exif_3", "exif_6", "exif_8", "cmyk_jpeg", "gray_jpeg", "png", "rgba_png"])
def test_variants_decode_back_to_the_upright_photo(variant):
    yy, xx = np.mgrid[0:120, 0:200]
    upright = np.stack([xx * 255 // 200, yy * 255 // 120, np.full_like(xx, 90)], axis=2).astype(np.uint8)
    upright[:30, :40] = (250, 20, 20)  # a red top-left corner shows any rotation or flip
    data, ext = encode(Image.fromarray(upright), variant, np.random.default_rng(0))
    assert ext == (".png" if variant.endswith("png") else ".jpg")
    with Image.open(io.BytesIO(data)) as image:
        if variant.startswith("exif_"):
            assert image.size == ((120, 200) if variant in ("exif_6", "exif_8") else (200, 120))
        restored = ImageOps.exif_transpose(image).convert("RGB")
    assert restored.size == (200, 120)
    if variant == "gray_jpeg":
        expected = np.asarray(Image.fromarray(upright).convert("L").convert("RGB"), np.int16)
    else:
        expected = upright.astype(np.int16)
        assert np.asarray(restored)[5:25, 5:35, 0].mean() > 200  # the red corner is still top-left
    assert np.abs(np.asarray(restored, np.int16) - expected).mean() < 8, variant


def test_corrupt_jpeg_keeps_its_header_but_does_not_decode(demo_set):
    root, _ = demo_set
    jpeg = next(p for p in sorted((root / "images").glob("*.jpg")))
    data = jpeg.read_bytes()
    broken = corrupt_jpeg(data)
    assert broken[:2] == b"\xff\xd8" and broken == corrupt_jpeg(data)
    with Image.open(io.BytesIO(broken)) as image:
        assert image.format == "JPEG" and image.size == Image.open(jpeg).size
        with pytest.raises(OSError):
            image.load()


def test_rerun_with_fewer_photos_removes_stale_files(tmp_path):
    generate(tmp_path, workers=1, seed=1, n_landmarks=2, views_per_landmark=2, n_nonlandmarks=3)
    generate(tmp_path, workers=1, seed=1, n_landmarks=2, views_per_landmark=2, n_nonlandmarks=1)
    files = {p.name for p in (tmp_path / "images").iterdir()}
    assert files == {file_of(row["url"]) for row in read_rows(tmp_path)}
    assert len(files) == 5


def test_invalid_arguments_are_clear_errors(tmp_path):
    with pytest.raises(StageError, match="broken_fraction"):
        generate(tmp_path, broken_fraction=1.5)
    with pytest.raises(StageError, match="base_url"):
        generate(tmp_path, base_url="ftp://example")
    with pytest.raises(StageError, match="new_photos"):
        generate(tmp_path, new_photos=-1)


def read_new_photos(root: Path) -> dict[str, str]:
    with open(root / "new_photos.csv", newline="") as fh:
        assert fh.readline().strip() == "file,landmark_id"
        fh.seek(0)
        return {row["file"]: row["landmark_id"] for row in csv.DictReader(fh)}


def upright_pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
        return repr(upright.size).encode() + upright.tobytes()


def test_new_photos_are_written_with_their_answers(demo_set):
    root, counts = demo_set
    answers = read_new_photos(root)
    assert counts["new_photos"] == N_NEW
    assert json.loads((root / "demo.json").read_text())["counts"]["new_photos"] == N_NEW
    assert set(answers) == {p.name for p in (root / "new_photos").iterdir()}
    # Names tell nothing: a shuffled number each, and no landmark id in them.
    assert {name.rsplit(".", 1)[0] for name in answers} == {f"photo-{k:02d}" for k in range(1, N_NEW + 1)}
    set_labels = {row["landmark_id"] for row in read_rows(root)} - {""}
    assert not any(label in name for name in answers for label in set_labels)
    labels = [answers[name] for name in sorted(answers)]
    assert labels.count("") == 4
    assert sorted(labels, key=bool) != labels  # non-landmarks are not simply all first (or last)
    # One new view of every landmark (5 of them, so the first 3 get a second one), with the set's ids.
    landmark_labels = [label for label in labels if label]
    assert set(landmark_labels) == set_labels
    assert sorted(landmark_labels.count(label) for label in set_labels) == [1, 1, 2, 2, 2]
    for name in answers:
        path = root / "new_photos" / name
        with Image.open(path) as image:
            assert (image.format == "PNG") == name.endswith(".png")
            assert 200 <= max(ImageOps.exif_transpose(image).size) <= 900
            image.load()


def test_new_photos_are_unseen(demo_set):
    root, _ = demo_set
    old = sorted((root / "images").iterdir())
    new = sorted((root / "new_photos").iterdir())
    assert len(new) == N_NEW
    old_bytes = {hashlib.sha256(p.read_bytes()).digest() for p in old}
    new_bytes = {hashlib.sha256(p.read_bytes()).digest() for p in new}
    assert len(new_bytes) == N_NEW and not new_bytes & old_bytes
    old_pixels = {hashlib.sha256(upright_pixels(p)).digest() for p in old}
    new_pixels = {hashlib.sha256(upright_pixels(p)).digest() for p in new}
    assert len(new_pixels) == N_NEW and not new_pixels & old_pixels


def test_new_photos_change_nothing_else(demo_set, tmp_path, capsys):
    root, _ = demo_set
    out = tmp_path / "none"
    assert (
        main(
            [
                "generate",
                "--out",
                str(out),
                "--settings",
                json.dumps(SMALL_SETTINGS | {"new_photos": 0}),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["new_photos"] == 0
    # No new photos, and the set's files are byte for byte those written alongside new photos.
    assert (out / "new_photos").is_dir() and not list((out / "new_photos").iterdir())
    assert (out / "new_photos.csv").read_text() == "file,landmark_id\n"
    with_new, without = tree_hashes(root), tree_hashes(out)
    for name in ("demo.json", "new_photos.csv"):
        with_new.pop(name), without.pop(name)
    assert {k: v for k, v in with_new.items() if not k.startswith("new_photos/")} == without
    meta_with, meta_without = (json.loads((r / "demo.json").read_text()) for r in (root, out))
    assert meta_with["counts"].pop("new_photos") == N_NEW and meta_without["counts"].pop("new_photos") == 0
    assert meta_with == meta_without


def test_cli_settings_host_and_port_make_the_urls(tmp_path, capsys):
    """The workflow passes config.yaml's demo section as --settings: its host and port are the server's."""
    tiny = {"seed": 1, "landmarks": 2, "views_per_landmark": 2, "nonlandmarks": 2, "new_photos": 0}
    settings = json.dumps(tiny | {"host": "localhost", "port": 9911, "out_dir": "ignored"})
    assert main(["generate", "--out", str(tmp_path / "a"), "--settings", settings, "--workers", "1"]) == 0
    assert all(row["url"].startswith("http://localhost:9911/") for row in read_rows(tmp_path / "a"))
    assert json.loads((tmp_path / "a" / "demo.json").read_text())["arguments"]["n_landmarks"] == 2
    # --base-url overrides the one the settings make
    override = ["--base-url", "http://example.org:80/", "--workers", "1"]
    assert main(["generate", "--out", str(tmp_path / "b"), "--settings", settings, *override]) == 0
    assert all(row["url"].startswith("http://example.org:80/") for row in read_rows(tmp_path / "b"))
    capsys.readouterr()


@pytest.mark.parametrize(
    "settings, message",
    [
        ('{"landmarks": 5, "views": 4}', "views"),  # an unknown key is named
        ('{"broken_fraction": 1.5}', "broken_fraction"),
        ('{"seed": "seven"}', "seed"),
        ("{not json", "not valid JSON"),
    ],
)
def test_cli_settings_are_validated_by_the_config_schema(tmp_path, settings, message):
    with pytest.raises(StageError, match=message):
        main(["generate", "--out", str(tmp_path), "--settings", settings])
    assert not (tmp_path / "urls.csv").exists()


def test_rerun_with_fewer_new_photos_removes_stale_ones(tmp_path):
    tiny = {"workers": 1, "seed": 1, "n_landmarks": 2, "views_per_landmark": 2, "n_nonlandmarks": 1}
    generate(tmp_path, new_photos=4, **tiny)
    new_dir = tmp_path / "new_photos"
    assert len(list(new_dir.iterdir())) == 4 + 2
    (new_dir / "notes.txt").write_text("not ours\n")
    generate(tmp_path, new_photos=1, **tiny)
    assert {p.name for p in new_dir.iterdir()} == set(read_new_photos(tmp_path)) | {"notes.txt"}
    empty, label = sorted(read_new_photos(tmp_path).values())  # 1 landmark view, ceil(1 / 2) other
    assert empty == "" and label in {row["landmark_id"] for row in read_rows(tmp_path)} - {""}
    generate(tmp_path, new_photos=0, **tiny)
    assert [p.name for p in new_dir.iterdir()] == ["notes.txt"] and read_new_photos(tmp_path) == {}


def test_lookalike_pairs_share_their_structure_family():
    specs = landmark_specs(2026, 48)
    twins = [s for s in specs if s.twin_of is not None]
    assert len(twins) == 6
    assert all(s.family == specs[s.twin_of].family for s in twins)
    assert len({s.family for s in specs}) == len(STRUCTURE_FAMILIES)


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


def test_good_urls_return_the_file_bytes(demo_set, server):
    root, _ = demo_set
    faults = read_faults(root)
    good = [row for row in read_rows(root) if row["id"] not in faults]
    assert good
    for row in good:
        name = file_of(row["url"])
        with urllib.request.urlopen(local_url(server, row["url"]), timeout=TIMEOUT) as resp:
            assert resp.status == 200
            expected_type = "image/png" if name.endswith(".png") else "image/jpeg"
            assert resp.headers["Content-Type"] == expected_type
            assert resp.read() == (root / "images" / name).read_bytes()


def fault_url(root: Path, srv: DemoServer, kind: str) -> tuple[str, str]:
    faults = read_faults(root)
    row = next(r for r in read_rows(root) if faults.get(r["id"]) == kind)
    return local_url(srv, row["url"]), file_of(row["url"])


@pytest.mark.parametrize("kind, status", [("not_found", 404), ("server_error", 500)])
def test_error_status_faults_always_fail(demo_set, server, kind, status):
    url, _ = fault_url(demo_set[0], server, kind)
    for _ in range(2):  # retrying does not help
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=TIMEOUT)
        assert err.value.code == status


def test_html_fault_is_a_web_page(demo_set, server):
    url, _ = fault_url(demo_set[0], server, "html")
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        assert resp.read().startswith(b"<!DOCTYPE html>")


def test_corrupt_fault_is_an_undecodable_jpeg(demo_set, server):
    url, name = fault_url(demo_set[0], server, "corrupt")
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
        data = resp.read()
    assert data == corrupt_jpeg((demo_set[0] / "images" / name).read_bytes())
    with Image.open(io.BytesIO(data)) as image, pytest.raises(OSError):
        image.load()


def test_truncated_fault_sends_less_than_its_content_length(demo_set, server):
    url, name = fault_url(demo_set[0], server, "truncated")
    size = (demo_set[0] / "images" / name).stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("GET", url[len(server.base_url) :])
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == size
        with pytest.raises(http.client.IncompleteRead) as err:
            resp.read()
        assert 0 < len(err.value.partial) < size
    finally:
        conn.close()


def test_slow_fault_outlasts_the_client_timeout(demo_set, server):
    url, _ = fault_url(demo_set[0], server, "slow")
    started = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        urllib.request.urlopen(url, timeout=0.5).read()
    assert time.monotonic() - started < 3


def test_slow_requests_do_not_block_shutdown(demo_set):
    url_path = None
    outcome = {}
    with DemoServer(demo_set[0], slow_seconds=120) as srv:
        url_path, _ = fault_url(demo_set[0], srv, "slow")

        def client():
            try:
                urllib.request.urlopen(url_path, timeout=30).read()
                outcome["result"] = "answered"
            except Exception as err:
                outcome["result"] = type(err).__name__

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        time.sleep(0.3)  # the request is now waiting inside the server
        started = time.monotonic()
    assert time.monotonic() - started < 5
    thread.join(10)
    assert not thread.is_alive() and outcome["result"] != "answered"


@pytest.mark.parametrize(
    "path",
    [
        "/images/../urls.csv",
        "/images/..%2Furls.csv",
        "/images/%2e%2e/urls.csv",
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/fault/html/..%2Furls.csv",
        "/fault/truncated/..%2Fdemo.json",
        "/images/.hidden.jpg",
        "/urls.csv",
    ],
)
def test_path_traversal_is_refused(server, path):
    status, _, body = raw_get(server.port, path)
    assert status in (400, 403, 404)
    assert b"id,url" not in body and b"root:" not in body


def test_files_are_looked_up_per_request(tmp_path):
    with DemoServer(tmp_path / "not-yet") as srv:
        name = "0123456789abcdef.jpg"
        assert raw_get(srv.port, f"/images/{name}")[0] == 404
        (tmp_path / "not-yet" / "images").mkdir(parents=True)
        (tmp_path / "not-yet" / "images" / name).write_bytes(b"\xff\xd8data")
        status, headers, body = raw_get(srv.port, f"/images/{name}")
        assert status == 200 and body == b"\xff\xd8data" and headers["Content-Type"] == "image/jpeg"
        assert raw_get(srv.port, "/healthz")[2] == b"ok\n"


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(StageError, match=f"port {port}"):
            DemoServer(tmp_path, port=port).start()
        result = subprocess.run(
            [sys.executable, "-m", "landmarks.demo", "serve", "--root", str(tmp_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "already in use" in result.stderr


def test_start_and_stop_server_process(demo_set, tmp_path):
    log_path = tmp_path / "server.log"
    proc = start_server_process(demo_set[0], "127.0.0.1", free_port(), timeout=30, log_path=log_path)
    try:
        port = int(proc.args[proc.args.index("--port") + 1])
        assert raw_get(port, "/healthz")[0] == 200
    finally:
        code = stop_server_process(proc)
    assert code == 0
    assert "demo server stopped" in log_path.read_text()


def test_start_server_process_reports_a_failed_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(StageError, match="already in use"):
            start_server_process(tmp_path, "127.0.0.1", port, timeout=30)


# The intermediate parent: starts the server as its child, waits until it is ready, then exits.
INTERMEDIATE = """
import os, subprocess, sys, time
root, port, ready = sys.argv[1:4]
server = subprocess.Popen([sys.executable, "-m", "landmarks.demo", "serve", "--root", root, "--port", port,
                           "--parent-pid", str(os.getpid()), "--ready-file", ready],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 30
while not os.path.exists(ready) and time.monotonic() < deadline and server.poll() is None:
    time.sleep(0.05)
print(server.pid, flush=True)
"""


def test_serve_exits_when_its_parent_process_is_gone(tmp_path):
    ready = tmp_path / "ready.json"
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-c", INTERMEDIATE, str(tmp_path), str(port), str(ready)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    server_pid = int(result.stdout.strip())
    try:
        info = json.loads(ready.read_text())
        assert info["pid"] == server_pid and info["port"] == port
        deadline = time.monotonic() + 10  # the server polls its parent every second
        while process_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(server_pid)
        assert not ready.exists()  # removed on a clean exit
    finally:
        if process_alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def test_the_server_loads_without_the_drawing_modules():
    """The Snakefile's onstart hook imports landmarks.demo.server: it must not pay for the drawing code."""
    code = (
        "import sys, landmarks.demo.server; "
        "print(sorted(m for m in sys.modules if m.startswith(('landmarks.demo.', 'PIL'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['landmarks.demo.server']"


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "landmarks.demo", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and "/fault/truncated/" in result.stdout
