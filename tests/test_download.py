"""`python -m tools.download_pixmo` against a local HTTP server on 127.0.0.1 (no other network)."""
import collections
import hashlib
import http.server
import pathlib
import socket
import sys
import threading
import time

import pyarrow as pa
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures" / "pipeline"))
import hub_data  # noqa: E402

from input_pipeline.builders import hub  # noqa: E402
from tools import download_pixmo  # noqa: E402

IMAGE_A = hub_data.image_bytes(30, 20, seed=1)
IMAGE_B = hub_data.image_bytes(20, 30, seed=2, fmt="PNG")
SERVER_LIFETIME_S = 60  # the server stops by itself after this, whatever happens to the test


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: collections.Counter = collections.Counter()

    def do_GET(self):  # noqa: N802 - the http.server API
        self.hits[self.path] += 1
        if self.path == "/slow":
            time.sleep(1.0)
        routes = {"/a.jpg": (200, IMAGE_A), "/b.png": (200, IMAGE_B), "/wrong-sha.jpg": (200, IMAGE_B),
                  "/page.html": (200, b"<html>not an image</html>"), "/always-429": (429, b"slow down"),
                  "/flaky.jpg": (429, b"") if self.hits[self.path] == 1 else (200, IMAGE_B)}
        status, body = routes.get(self.path, (404, b"not found"))
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # /slow: the client has given up already
            pass

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture()
def server():
    _Handler.hits = collections.Counter()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    stopper = threading.Timer(SERVER_LIFETIME_S, httpd.shutdown)
    stopper.daemon = True
    stopper.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stopper.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source(tmp_path, base):
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    with_sha = [(f"{base}/a.jpg", sha(IMAGE_A)), (f"{base}/wrong-sha.jpg", sha(IMAGE_A)),
                (f"{base}/gone.jpg", sha(IMAGE_A)), (f"{base}/a.jpg", sha(IMAGE_A))]  # a duplicate URL
    hub_data.write(tmp_path / "hub" / "pixmo-points" / "data" / "train-00000-of-00001.parquet",
                   [{"image_url": u, "image_sha256": s, "label": "x"} for u, s in with_sha],
                   pa.schema([("image_url", pa.string()), ("image_sha256", pa.string()), ("label", pa.string())]))
    plain = [f"{base}/b.png", f"{base}/page.html", f"{base}/flaky.jpg", f"{base}/always-429", f"{base}/slow",
             f"http://127.0.0.1:{_closed_port()}/refused.jpg", "ftp://example.invalid/x.jpg"]
    hub_data.write(tmp_path / "hub" / "pixmo-cap" / "data" / "train-00000-of-00001.parquet",
                   [{"image_url": u, "caption": "c"} for u in plain],
                   pa.schema([("image_url", pa.string()), ("caption", pa.string())]))
    return str(tmp_path / "hub")


def _run(capsys, *argv):
    assert download_pixmo.main(list(argv)) == 0
    return capsys.readouterr().out.splitlines()


def test_downloads_verify_and_resume(server, tmp_path, capsys):
    source, images = _source(tmp_path, server), tmp_path / "images"
    args = ["--source", source, "--images", str(images), "--timeout", "0.3", "--retries", "2", "--backoff", "0",
            "--workers", "4"]
    lines = _run(capsys, *args)
    assert lines == ["downloaded 3, already present 0, failed 7, failed in an earlier run (not retried) 0",
                     "  1: HTTP 404", "  1: HTTP 429", "  1: connection error (ConnectionRefusedError)",
                     "  1: not an http(s) URL", "  1: not an image", "  1: sha256 mismatch", "  1: timeout"]
    assert (images / hub.url_filename(f"{server}/a.jpg")).read_bytes() == IMAGE_A
    assert (images / hub.url_filename(f"{server}/b.png")).read_bytes() == IMAGE_B
    assert (images / hub.url_filename(f"{server}/flaky.jpg")).read_bytes() == IMAGE_B  # 429, then fine
    assert not (images / hub.url_filename(f"{server}/wrong-sha.jpg")).exists()
    marker = images / ".failed" / hub.url_filename(f"{server}/wrong-sha.jpg")
    assert marker.read_text().splitlines() == [f"{server}/wrong-sha.jpg", "sha256 mismatch"]
    assert _Handler.hits["/a.jpg"] == 1 and _Handler.hits["/always-429"] == 3  # deduplicated; 1 try + 2 retries
    assert not list(images.glob(".part-*")) and len(list(images.iterdir())) == 4  # 3 images + .failed/

    before = sum(_Handler.hits.values())
    lines = _run(capsys, *args)  # resumable: nothing is fetched again
    assert lines[0] == "downloaded 0, already present 3, failed 0, failed in an earlier run (not retried) 7"
    assert sum(_Handler.hits.values()) == before

    (images / hub.url_filename(f"{server}/a.jpg")).write_bytes(b"half a fi")  # a damaged file is replaced
    lines = _run(capsys, *args, "--retry-failed")
    assert lines[0].startswith("downloaded 1, already present 2, failed 7,")
    assert (images / hub.url_filename(f"{server}/a.jpg")).read_bytes() == IMAGE_A


def test_builders_report_failed_downloads(tmp_path):
    images = tmp_path / "images"
    (images / ".failed").mkdir(parents=True)
    (images / ".failed" / hub.url_filename("http://x/1.jpg")).write_text("http://x/1.jpg\nHTTP 404\n")
    folder = hub.ImageFolder(str(images))
    with pytest.raises(hub.SkipRecord, match="download failed"):
        folder.read("http://x/1.jpg")
    with pytest.raises(hub.SkipRecord, match="image not downloaded"):
        folder.read("http://x/2.jpg")


def test_url_file_names_match_the_builders_and_the_original_rule():
    url = "https://example.org/p/123.jpg"
    assert download_pixmo.url_filename(url) == hub.url_filename(url) == hashlib.sha256(url.encode()).hexdigest()


def test_urls_file_and_bad_arguments(tmp_path, capsys):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://a/1.jpg\nhttp://a/2.jpg ABCDEF\n\n")
    assert download_pixmo.collect_urls(None, [], str(urls)) == {"http://a/1.jpg": None, "http://a/2.jpg": "abcdef"}
    for argv, message in [(["--images", str(tmp_path)], "give --source"),
                          (["--images", str(tmp_path), "--urls", str(tmp_path / "nope")], "is not a file"),
                          (["--images", str(tmp_path), "--urls", str(urls), "--workers", "0"], "--workers must be")]:
        with pytest.raises(SystemExit) as exit_info:
            download_pixmo.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
