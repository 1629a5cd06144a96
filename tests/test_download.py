"""The download stage against a fault-injecting server on 127.0.0.1 (tests/faultserver.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from landmarks import download
from landmarks.common import StageError, image_relpath, run_cli
from landmarks.download import HostScheduler, Job, PartDownloader, Settings, inspect_image
from landmarks.tables import MANIFEST_SCHEMA, PART_SCHEMA

sys.path.insert(0, str(Path(__file__).parent))
from faultserver import FaultServer

# Short limits so the faulty routes fail in well under a second each.
FAST = dict(
    concurrency=16,
    per_host=8,
    connect_timeout_s=1.0,
    read_timeout_s=0.4,
    total_timeout_s=0.8,
    retries=2,
    backoff_s=0.05,
    max_bytes=1_000_000,
    max_redirects=3,
    threads=2,
)


# ----------------------------------------------------------------------------- helpers


def photo(size=(64, 48), seed=0, mode="RGB", fmt="JPEG", **save) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def png16() -> bytes:
    image = Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20)
    assert image.mode.startswith("I;16")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("P", (40, 30), color) for color in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def corrupt_jpeg(data: bytes) -> bytes:
    """Intact headers, then part of the scan followed by an invalid marker and filler."""
    sos = data.find(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    return data[: scan + (len(data) - scan) // 3] + b"\xff\x02" + bytes(range(255)) * 2


def blank_png(size, mode="1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def write_part(path: Path, rows: list[tuple[str, str]], landmark_ids=None, splits=None) -> Path:
    n = len(rows)
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "url": [r[1] for r in rows],
            "landmark_id": landmark_ids or [i % 5 if i % 7 else None for i in range(n)],
            "split": splits or [None] * n,
            "row": list(range(1, n + 1)),
        },
        schema=PART_SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def run_part(tmp_path: Path, rows, name="part-000", **settings) -> dict[str, dict]:
    part = write_part(tmp_path / "split" / f"{name}.parquet", rows)
    out = tmp_path / "download" / name / "manifest.parquet"
    PartDownloader(part, tmp_path / "images", out, Settings(**{**FAST, **settings}), 0, progress=False).run()
    return {r["id"]: r for r in pq.read_table(out).to_pylist()}


def manifest_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def server():
    with FaultServer() as srv:
        yield srv


# ----------------------------------------------------------------------------- every fault kind


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_each_fault_kind_ends_with_its_own_status(tmp_path, server):
    jpeg = server.add("good.jpg", photo())
    server.add("cut-file.jpg", photo(seed=1)[:700])
    server.add("corrupt.jpg", corrupt_jpeg(photo(seed=2)))
    server.add("pixel-bomb.png", blank_png((6000, 6000)), "image/png")
    server.add("header-bomb.png", huge_png_header(12000, 10000), "image/png")
    u = server.url
    cases = {  # id -> (url, status, attempts)
        "ok0": (u(f"/img/{jpeg}"), "ok", 1),
        "nf0": (u("/status/404"), "http_404", 1),
        "fb0": (u("/status/403"), "http_403", 1),
        "gn0": (u("/status/410"), "http_410", 1),
        "br0": (u("/status/400"), "http_400", 1),
        "se0": (u("/status/500"), "http_500", 3),
        "ni0": (u("/status/501"), "http_501", 1),
        "fl0": (u(f"/flaky/2/{jpeg}"), "ok", 3),
        "rl0": (u(f"/ratelimit/1/{jpeg}"), "ok", 2),
        "sl0": (u(f"/slow/3/{jpeg}"), "timeout", 3),
        "dr0": (u(f"/drip/{jpeg}"), "timeout", 3),
        "lp0": (u("/loop"), "redirect_loop", 1),
        "rd0": (u(f"/redirect/2/{jpeg}"), "ok", 1),
        "rs0": (u("/redirect-scheme"), "bad_redirect", 1),
        "ct0": (u(f"/cut/{jpeg}"), "truncated", 3),
        "tf0": (u("/img/cut-file.jpg"), "truncated", 1),
        "co0": (u("/img/corrupt.jpg"), "corrupt_image", 1),
        "rt0": (u("/reset"), "connection_error", 3),
        "ht0": (u("/html"), "not_image", 1),
        "em0": (u("/empty"), "not_image", 1),
        "gz0": (u("/gzip-bomb/8"), "decompression_bomb", 1),
        "pb0": (u("/img/pixel-bomb.png"), "decompression_bomb", 1),
        "hb0": (u("/img/header-bomb.png"), "decompression_bomb", 1),
        "hg0": (u("/huge/2000000"), "too_large", 1),
        "hs0": (u("/huge-stream/2000000"), "too_large", 1),
        "cr0": ("http://127.0.0.1:1/refused.jpg", "connection_error", 3),
    }
    started = time.monotonic()
    manifest = run_part(tmp_path, [(k, v[0]) for k, v in cases.items()])
    elapsed = time.monotonic() - started
    for image_id, (url, status, attempts) in cases.items():
        row = manifest[image_id]
        assert (row["status"], row["attempts"]) == (status, attempts), (image_id, row)
        assert row["url"] == url and row["reason"] if status != "ok" else row["reason"] == ""
        if status == "ok":
            assert row["path"] == f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
            data = (tmp_path / "images" / row["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["sha256"] and row["bytes"] == len(data)
            assert (row["width"], row["height"], row["format"], row["http_status"]) == (64, 48, "JPEG", 200)
        else:
            assert row["path"] is None and row["sha256"] is None
            assert not list((tmp_path / "images").glob(f"*/*/*/{image_id}.*"))
    # Each kind names itself in the reason.
    assert "3 attempts" in manifest["se0"]["reason"] and manifest["se0"]["http_status"] == 500
    assert "silent" in manifest["sl0"]["reason"] and "within 0.8 s" in manifest["dr0"]["reason"]
    assert "HTML" in manifest["ht0"]["reason"] and "empty" in manifest["em0"]["reason"]
    assert "gzip" in manifest["gz0"]["reason"] and "pixels per byte" in manifest["pb0"]["reason"]
    assert "max_pixels" in manifest["hb0"]["reason"] and "Content-Length" in manifest["hg0"]["reason"]
    assert "ends early" in manifest["tf0"]["reason"] and "closed before the end" in manifest["ct0"]["reason"]
    # Retries really waited: Retry-After: 1 was honoured, backoff spaced the 503s.
    retry_times = server.times[f"/ratelimit/1/{jpeg}"]
    assert retry_times[1] - retry_times[0] >= 0.95
    assert server.hits["/status/404"] == 1 and server.hits["/status/500"] == 3
    assert elapsed < 20
    # Counts beside the manifest add up to the rows.
    counts = json.loads((tmp_path / "download/part-000/manifest.counts.json").read_text())
    assert counts["rows"] == len(cases) == sum(counts["by_status"].values())
    assert counts["ok"] == 4 and counts["by_status"]["timeout"] == 2


def test_formats_pillow_reads_are_kept(tmp_path, server):
    variants = {
        "jpg0": (photo(seed=3), "JPEG", ".jpg"),
        "prg0": (photo(seed=4, progressive=True), "JPEG", ".jpg"),
        "cmy0": (photo(seed=5, mode="CMYK"), "JPEG", ".jpg"),
        "gry0": (photo(seed=6, mode="L"), "JPEG", ".jpg"),
        "png0": (photo(seed=7, mode="RGBA", fmt="PNG"), "PNG", ".png"),
        "p160": (png16(), "PNG", ".png"),
        "gif0": (animated_gif(), "GIF", ".gif"),
        "wbp0": (photo(seed=8, fmt="WEBP"), "WEBP", ".webp"),
    }
    for image_id, (data, _, _) in variants.items():
        server.add(image_id, data, "application/octet-stream")  # content type is not trusted either way
    manifest = run_part(tmp_path, [(k, server.url(f"/img/{k}")) for k in variants])
    for image_id, (data, fmt, ext) in variants.items():
        row = manifest[image_id]
        assert (row["status"], row["format"]) == ("ok", fmt), row
        assert row["path"].endswith(image_id + ext)
        assert (tmp_path / "images" / row["path"]).read_bytes() == data  # bytes kept as served
        assert row["width"] > 0 and row["height"] > 0


def test_unsafe_ids_and_urls_fail_per_row_and_never_escape(tmp_path, server):
    good = server.add("g.jpg", photo())
    url = server.url(f"/img/{good}")
    rows = [
        ("../x", url),
        ("/etc/passwd", url),
        ("", url),
        ("a\x00b", url),
        ("x" * 300, url),
        (".hidden", url),
        ("a/b", url),
        ("fileurl", "file:///etc/passwd"),
        ("ftpurl", "ftp://example.org/a.jpg"),
        ("dataurl", "data:image/png;base64,iVBORw0KGgo="),
        ("relative", "images/a.jpg"),
        ("blank", ""),
        ("nohost", "http://"),
        ("idna", "http://xn--.com/a.jpg"),
        ("port", "http://h:99999/a.jpg"),
        ("ipv6", "http://[::1/a.jpg"),
        ("dots", "http://a..b/a.jpg"),
        ("fine", url),
    ]
    manifest = manifest_rows(write_and_run(tmp_path, rows))
    statuses = {r["id"]: (r["status"], r["attempts"]) for r in manifest}
    for bad in ("../x", "/etc/passwd", "", "a\x00b", "x" * 300, ".hidden", "a/b"):
        assert statuses[bad] == ("bad_id", 0)
    assert statuses["fileurl"] == statuses["ftpurl"] == statuses["dataurl"] == ("bad_scheme", 0)
    assert statuses["relative"] == statuses["blank"] == statuses["nohost"] == ("bad_url", 0)
    assert statuses["idna"] == statuses["port"] == statuses["ipv6"] == ("bad_url", 0)
    assert statuses["dots"] == ("bad_url", 1)  # only aiohttp's encoder finds this one: still per row
    assert statuses["fine"] == ("ok", 1)
    assert [r["id"] for r in manifest] == [r[0] for r in rows]  # one row per input row, same order
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "images" in p.parts]
    assert [p.name for p in written] == ["fine.jpg"]
    assert server.hits[f"/img/{good}"] == 1


def write_and_run(tmp_path: Path, rows, **settings) -> Path:
    part = write_part(tmp_path / "split" / "part-003.parquet", rows)
    out = tmp_path / "download" / "part-003" / "manifest.parquet"
    PartDownloader(part, tmp_path / "images", out, Settings(**{**FAST, **settings}), 3, progress=False).run()
    return out


def test_the_image_folder_holds_exactly_the_ok_rows_after_every_run(tmp_path, server):
    big, small, gone = (
        server.add("big.jpg", photo((400, 300), seed=1)),
        server.add("s.jpg", photo()),
        server.add("gone.jpg", photo(seed=2)),
    )
    rows = [
        ("bigone", server.url(f"/img/{big}")),
        ("smallone", server.url(f"/img/{small}")),
        ("goneone", server.url(f"/img/{gone}")),
        ("killed", server.url("/status/404")),
    ]
    part = write_part(tmp_path / "split" / "part-003.parquet", rows)
    out = tmp_path / "download" / "part-003" / "manifest.parquet"
    images = tmp_path / "images"

    def run(fresh=False, **settings):
        PartDownloader(part, images, out, Settings(**{**FAST, **settings}), 3, progress=False).run(fresh=fresh)
        manifest = pq.read_table(out).to_pylist()
        stored = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()}
        assert stored == {r["path"] for r in manifest if r["status"] == "ok"}  # nothing more, nothing less
        assert not (images / ".tmp").exists()
        return {r["id"]: r["status"] for r in manifest}

    assert run() == {"bigone": "ok", "smallone": "ok", "goneone": "ok", "killed": "http_404"}
    # A kill between an image's rename and its journal line, then a retry that fails: the file goes.
    stray = images / image_relpath("killed", ".jpg")
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(photo())
    assert run(fresh=True)["killed"] == "http_404" and not stray.exists()
    # A smaller byte cap, and a URL that now answers 404, on a fresh rerun.
    del server.files[gone]
    statuses = run(fresh=True, max_bytes=len(photo()) + 100)
    assert statuses == {"bigone": "too_large", "smallone": "ok", "goneone": "http_404", "killed": "http_404"}


def test_manifest_schema_and_carried_columns(tmp_path, server):
    name = server.add("a.jpg", photo())
    rows = [("abc", server.url(f"/img/{name}")), ("abd", server.url("/status/404"))]
    part = write_part(tmp_path / "part-007.parquet", rows, landmark_ids=[12, None], splits=["train", None])
    out = tmp_path / "m" / "manifest.parquet"
    assert (
        download.main(
            [
                "--part",
                str(part),
                "--images",
                str(tmp_path / "img"),
                "--out",
                str(out),
                "--no-progress",
                "--settings",
                json.dumps(FAST),
                "--retries",
                "0",
            ]
        )
        == 0
    )
    table = pq.read_table(out)
    assert table.schema.equals(MANIFEST_SCHEMA)
    rows = table.to_pylist()
    assert [(r["id"], r["landmark_id"], r["split"], r["part"], r["row"]) for r in rows] == [
        ("abc", 12, "train", 7, 1),
        ("abd", None, None, 7, 2),
    ]
    assert rows[1]["http_status"] == 404 and rows[1]["bytes"] is None and rows[0]["elapsed_s"] > 0


# ----------------------------------------------------------------------------- resume


def _slow_rows(server: FaultServer, n: int, delay: float) -> list[tuple[str, str]]:
    rows = []
    for i in range(n):
        name = server.add(f"r{i:04d}.jpg", photo((48, 32), seed=i))
        rows.append((f"{i:04d}ab", server.url(f"/img/{name}?delay={delay}")))
    for i in range(n // 10):  # some failures too: their rows must survive the kill as well
        rows.append((f"{i:04d}nf", server.url(f"/status/404?delay={delay}")))
    return rows


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


def test_kill_9_mid_download_then_resume_matches_an_uninterrupted_run(tmp_path, server):
    rows = _slow_rows(server, 150, delay=0.03)
    # Timeouts far above the 0.03 s delay: on a loaded machine FAST's 0.8 s can expire, and a retried
    # row's `attempts` would differ between the two runs for reasons that have nothing to do with resuming.
    settings = {**FAST, "concurrency": 4, "per_host": 4, "read_timeout_s": 10.0, "total_timeout_s": 20.0}
    part = write_part(tmp_path / "split" / "part-000.parquet", rows)
    killed = tmp_path / "killed"
    out = killed / "download" / "manifest.parquet"
    command = [
        sys.executable,
        "-m",
        "landmarks.download",
        "--part",
        str(part),
        "--images",
        str(killed / "images"),
        "--out",
        str(out),
        "--settings",
        json.dumps(settings),
        "--no-progress",
    ]
    journal = out.with_name("manifest.journal.jsonl")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") > 40:
                break
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    assert not out.exists()
    journaled_before = {json.loads(line)["id"] for line in journal.read_text().splitlines()[1:]}
    assert 40 <= len(journaled_before) < len(rows)
    # Whatever the kill interrupted, no image outside the temporary folder is half written.
    for path in (killed / "images").rglob("*.jpg"):
        if ".tmp" not in path.parts:
            Image.open(path).load()
    hits_before = dict(server.hits)

    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    resumed = manifest_rows(out)
    assert [r["id"] for r in resumed] == [r[0] for r in rows]  # no duplicate, none missing, same order
    for image_id, url in rows:  # journaled rows were not fetched again
        if image_id in journaled_before:
            path = url.split("127.0.0.1:")[1].split("/", 1)[1].split("?")[0]
            assert server.hits["/" + path] == hits_before["/" + path] == 1
    assert not list((killed / "images" / ".tmp").rglob("*"))  # the temporary folder was emptied

    fresh = tmp_path / "fresh"
    fresh_out = fresh / "download" / "manifest.parquet"
    PartDownloader(part, fresh / "images", fresh_out, Settings(**settings), 0, progress=False).run()
    assert _comparable(resumed) == _comparable(manifest_rows(fresh_out))


def test_rerun_reuses_the_journal_and_fetches_only_what_is_missing(tmp_path, server):
    rows = _slow_rows(server, 20, delay=0)
    rows.append(("flaky0", server.url("/status/500")))
    out = write_and_run(tmp_path, rows)
    first = manifest_rows(out)
    hits = dict(server.hits)
    # Snakemake deletes the manifest before a rerun; someone also deleted one image.
    out.unlink()
    victim = next(r for r in first if r["status"] == "ok")
    (tmp_path / "images" / victim["path"]).unlink()
    out = write_and_run(tmp_path, rows)
    assert _comparable(manifest_rows(out)) == _comparable(first)
    changed = {p: n - hits.get(p, 0) for p, n in server.hits.items() if n != hits.get(p, 0)}
    assert changed == {f"/img/r{victim['id'][:4]}.jpg": 1}
    # New settings that decide outcomes: the failures are retried, the successes kept.
    out.unlink()
    write_and_run(tmp_path, rows, retries=0)
    assert server.hits["/status/500"] == hits["/status/500"] + 1
    assert sum(server.hits[f"/img/r{i:04d}.jpg"] for i in range(20)) == 21


def test_two_runs_on_one_part_are_refused(tmp_path):
    part = write_part(tmp_path / "part-000.parquet", [("abc", "http://127.0.0.1:1/a.jpg")])
    out = tmp_path / "d" / "manifest.parquet"
    holder = download.Journal(out)
    holder.lock()
    try:
        with pytest.raises(StageError, match="another download process"):
            PartDownloader(part, tmp_path / "images", out, Settings(**FAST), 0, progress=False).run()
    finally:
        holder.close()


def test_parts_running_side_by_side_share_the_image_folder(tmp_path, server):
    names = [server.add(f"s{i}.jpg", photo(seed=i)) for i in range(40)]
    parts = [[(f"{i:03d}x", server.url(f"/img/{names[i]}")) for i in range(k, 40, 2)] for k in (0, 1)]
    errors = []

    def run(k):
        try:
            part = write_part(tmp_path / "split" / f"part-{k:03d}.parquet", parts[k])
            PartDownloader(
                part, tmp_path / "images", tmp_path / f"d{k}" / "manifest.parquet", Settings(**FAST), k, progress=False
            ).run()
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for k in (0, 1):
        assert {r["status"] for r in manifest_rows(tmp_path / f"d{k}" / "manifest.parquet")} == {"ok"}
    assert len(list((tmp_path / "images").rglob("*.jpg"))) == 40


# ----------------------------------------------------------------------------- units


def test_inspect_image_statuses():
    good = photo()
    check = lambda data, **kw: inspect_image(data, kw.get("max_pixels", 10**8), kw.get("ratio", 1000.0))  # noqa: E731
    assert check(good).status == "ok"
    assert check(good[: len(good) // 2]).status == "truncated"
    assert check(corrupt_jpeg(good)).status == "corrupt_image"
    assert check(b"<html><body>gone</body></html>").status == "not_image"
    assert check(huge_png_header(100_000, 100_000)).status == "decompression_bomb"
    assert check(good, max_pixels=1000).status == "decompression_bomb"
    assert check(blank_png((6000, 6000))).status == "decompression_bomb"
    assert check(blank_png((3000, 3000), "RGB")).status == "ok"  # very compressible, but small


def test_jpegs_that_libjpeg_only_warns_about_are_not_ok():
    check = lambda data: inspect_image(data, 10**8, 1000.0)  # noqa: E731
    good = photo((96, 64), seed=3)
    sos = good.find(b"\xff\xda")
    headers = good[: sos + 2 + int.from_bytes(good[sos + 2 : sos + 4], "big")]  # up to the end of the SOS segment
    noise = np.random.default_rng(1).integers(0, 255, 4000, dtype=np.uint8).tobytes()  # 0..254: no 0xFF marker
    random_scan = check(headers + noise)
    assert (random_scan.status, random_scan.width) == ("truncated", 96), random_scan
    assert "Premature end of JPEG file" in random_scan.reason
    assert check(good[:-2]).status == "truncated"  # the end marker cut off
    extraneous = good[:sos] + b"\x00\x17\x2a" + good[sos:]  # stray bytes before the SOS marker
    assert check(extraneous).status == "corrupt_image" and "extraneous bytes" in check(extraneous).reason
    damaged_header = good[:2] + b"\xff\xe0\x00\x02" + bytes(range(40))  # a JPEG start, then garbage
    assert check(damaged_header).status == "corrupt_image" and "JPEG header" in check(damaged_header).reason
    for fine in (photo(mode="CMYK"), photo(mode="L"), photo(progressive=True), photo(subsampling=0, quality=95)):
        assert check(fine).status == "ok"


def test_without_the_jpeg_decoder_the_stage_stops_before_calling_any_jpeg_corrupt(tmp_path):
    # Seen on a machine without simplejpeg: every JPEG got status corrupt_image, kept in the manifest.
    code = (
        "import runpy, sys; sys.modules['simplejpeg'] = None; "  # None in sys.modules: the import fails
        "runpy.run_module('landmarks.download', run_name='__main__', alter_sys=True)"
    )
    part = tmp_path / "part-000.parquet"
    pq.write_table(pa.table({"id": ["a"], "url": ["http://127.0.0.1:9/a.jpg"], "landmark_id": [1]}), part)
    out = tmp_path / "out" / "manifest.parquet"
    command = [sys.executable, "-c", code, "--part", str(part), "--images", str(tmp_path / "images"), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "the download check decodes JPEGs with simplejpeg, which cannot be imported" in result.stderr
    assert not out.exists()


def test_host_scheduler_limits_each_host_without_stalling_others():
    async def scenario():
        jobs = [Job(i, str(i), "", "slow" if i < 30 else f"h{i % 3}") for i in range(60)]
        scheduler = HostScheduler(jobs, per_host=2, lookahead=100)
        running, peak, order = {}, {}, []

        async def worker():
            while (job := await scheduler.next_job()) is not None:
                running[job.host] = running.get(job.host, 0) + 1
                peak[job.host] = max(peak.get(job.host, 0), running[job.host])
                order.append(job.host)
                await asyncio.sleep(0.02 if job.host == "slow" else 0.001)
                running[job.host] -= 1
                retry = time.monotonic() + 0.01 if job.index == 45 and job.attempts == 0 else None
                job.attempts += 1
                scheduler.finished(job, retry_at=retry)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(8))), 10)
        return peak, order

    peak, order = asyncio.run(scenario())
    assert max(peak.values()) <= 2 and set(peak) == {"slow", "h0", "h1", "h2"}
    assert len(order) == 61  # every job once, plus one retry
    assert order.index("h0") < 5  # the fast hosts did not wait for the 30 slow jobs


def test_retry_helpers():
    assert download.parse_retry_after("7") == 7.0
    assert download.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 60) == pytest.approx(60)
    assert download.parse_retry_after("soon") is None
    delays = [download.backoff_delay(k, 1.0, None) for k in (1, 2, 3) for _ in range(20)]
    assert all(0.5 <= d <= 1.5 for d in delays[:20]) and all(1.0 <= d <= 3.0 for d in delays[20:40])
    assert all(2.0 <= d <= 6.0 for d in delays[40:])
    assert download.backoff_delay(1, 0.1, 5.0) == 5.0
    assert download.backoff_delay(30, 1.0, None) <= 1.5 * download.MAX_BACKOFF_S


def test_settings_and_cli_errors(tmp_path, capsys):
    with pytest.raises(StageError, match="unknown key 'concurency' under 'download'"):
        download.load_settings('{"concurency": 3}', {})
    # The entry point checks its settings against config.yaml's schema: a one-line error naming the key.
    for settings, problem in (
        ('{"retries": "x"}', "'x' is not of type 'integer'"),
        ('{"max_bytes": null}', "None is not of type 'integer'"),
        ('{"retries": 1.5}', "1.5 is not of type 'integer'"),
    ):
        key = "retries" if "retries" in settings else "max_bytes"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "landmarks.download",
                "--part",
                "p",
                "--images",
                "i",
                "--out",
                "o",
                "--settings",
                settings,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"key 'download.{key}': {problem}" in result.stderr
    assert download.load_settings('{"retries": 1}', {"retries": 5}).retries == 5
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: download.main(["--part", str(tmp_path / "nope.parquet"), "--images", "i", "--out", "o"]))
    assert exit_info.value.code == 2 and "nope.parquet: file not found" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "landmarks.download", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--max-pixels-per-byte" in result.stdout


def test_full_disk_stops_the_stage_instead_of_failing_rows(tmp_path, server, monkeypatch):
    name = server.add("a.jpg", photo())
    part = write_part(tmp_path / "part-000.parquet", [("abc", server.url(f"/img/{name}"))])
    out = tmp_path / "d" / "manifest.parquet"

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(download.run, "place_file", no_space)  # where PartDownloader looks it up
    with pytest.raises(StageError, match="No space left"):
        PartDownloader(part, tmp_path / "images", out, Settings(**FAST), 0, progress=False).run()
    assert not out.exists()


# ----------------------------------------------------------------------------- GLDv2 tar shards


def make_tar(members: dict[str, bytes], extra_symlink: bool = True) -> bytes:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo("a/b/c")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra_symlink:
            link = tarfile.TarInfo("x/y/z/link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    return buffer.getvalue()


def test_gldv2_shards_are_verified_retried_extracted_and_give_the_same_manifest(tmp_path, server):
    from landmarks import gldv2

    shard0 = make_tar(
        {"a/b/c/abc001.jpg": photo(seed=1), "a/b/c/abc002.jpg": photo(seed=2)[:600], "notes.txt": b"hello"}
    )
    shard1 = make_tar({"../../escape01.jpg": photo(seed=3), "d/e/f/def001.jpg": photo(seed=4)})
    for shard, data in ((0, shard0), (1, shard1)):
        server.add(f"images_{shard:03d}.tar", data, "application/x-tar")
        server.add(
            f"md5.images_{shard:03d}.txt",
            f"{hashlib.md5(data).hexdigest()}  images_{shard:03d}.tar\n".encode(),
            "text/plain",
        )
    settings = Settings(**{**FAST, "retries": 2, "read_timeout_s": 5})
    images, index_dir = tmp_path / "images", tmp_path / "gldv2"
    # Shard 1 arrives damaged the first time: the md5 check catches it and it is fetched again.
    tar_url = server.url("/corrupt-once/images_{shard:03d}.tar")
    asyncio.run(
        gldv2.fetch_shards([0, 1], images, index_dir, settings, tar_url, server.url("/img/md5.images_{shard:03d}.txt"))
    )
    assert server.hits["/corrupt-once/images_001.tar"] == 2 and server.hits["/corrupt-once/images_000.tar"] == 2
    assert (images / "e/s/c/escape01.jpg").read_bytes() == photo(seed=3)  # folder names from the tar are ignored
    assert not (tmp_path / "escape01.jpg").exists() and not list(images.rglob("link.jpg"))

    part = write_part(
        tmp_path / "part-002.parquet", [("abc001", "u1"), ("abc002", "u2"), ("def001", "u3"), ("zzz999", "u4")]
    )
    out = tmp_path / "m" / "manifest.parquet"
    assert gldv2.main(["manifest", "--part", str(part), "--index-dir", str(index_dir), "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.schema.equals(MANIFEST_SCHEMA)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert [rows[i]["status"] for i in ("abc001", "abc002", "def001", "zzz999")] == [
        "ok",
        "truncated",
        "ok",
        "not_in_shards",
    ]
    assert rows["abc001"]["sha256"] == hashlib.sha256(photo(seed=1)).hexdigest() and rows["abc001"]["part"] == 2
    assert rows["abc001"]["path"] == "a/b/c/abc001.jpg" and rows["abc002"]["path"] is None

    # A rerun skips finished shards.
    hits = dict(server.hits)
    asyncio.run(
        gldv2.fetch_shards([0, 1], images, index_dir, settings, tar_url, server.url("/img/md5.images_{shard:03d}.txt"))
    )
    assert dict(server.hits) == hits


def test_gldv2_resumes_a_cut_tar_and_gives_up_on_a_wrong_md5(tmp_path, server):
    from landmarks import gldv2

    data = make_tar({f"a/b/c/abc{i:03d}.jpg": photo(seed=i) for i in range(6)})
    server.add("images_000.tar", data, "application/x-tar")
    server.add("md5.images_000.txt", hashlib.md5(data).hexdigest().encode(), "text/plain")
    server.add("md5.images_001.txt", b"0" * 32, "text/plain")
    server.add("images_001.tar", data, "application/x-tar")
    images, index_dir = tmp_path / "images", tmp_path / "idx"
    work = gldv2.work_dir(images, index_dir, [0, 1])
    work.mkdir(parents=True)
    (work / "images_000.tar.part").write_bytes(data[: len(data) // 2])  # what a killed run left
    settings = Settings(**{**FAST, "retries": 1, "backoff_s": 0.01, "read_timeout_s": 5})
    with pytest.raises(StageError, match=r"(?s)1 shard\(s\) failed.*images_001.*does not match"):
        asyncio.run(
            gldv2.fetch_shards(
                [0, 1],
                images,
                index_dir,
                settings,
                server.url("/img/images_{shard:03d}.tar"),
                server.url("/img/md5.images_{shard:03d}.txt"),
            )
        )
    assert server.ranges["/img/images_000.tar"] == [f"bytes={len(data) // 2}-"]
    assert (index_dir / "images_000.parquet").exists() and not (index_dir / "images_001.parquet").exists()
    assert server.hits["/img/images_001.tar"] == 2
    assert len(list(images.rglob("abc*.jpg"))) == 6


def test_gldv2_fetch_takes_its_shards_and_urls_from_the_download_settings(tmp_path, monkeypatch):
    from landmarks import gldv2

    seen = {}

    async def fake_fetch(shards, images, index_dir, settings, tar_url, md5_url, keep_tars):
        seen.update(shards=list(shards), tar_url=tar_url, md5_url=md5_url, retries=settings.retries)

    monkeypatch.setattr(gldv2, "fetch_shards", fake_fetch)
    settings = {"mode": "gldv2", "gldv2_shards": "0-5", "gldv2_tar_url": "http://h/{shard}.tar", "retries": 7}
    argv = ["fetch", "--jobs", "2", "--job", "1", "--images", str(tmp_path), "--index-dir", str(tmp_path)]
    assert gldv2.main([*argv, "--settings", json.dumps(settings)]) == 0
    assert seen == {"shards": [1, 3, 5], "tar_url": "http://h/{shard}.tar", "md5_url": gldv2.MD5_URL, "retries": 7}
