"""Download the images of the URL-based PixMo datasets into one folder, named as the original names them.

    python -m tools.download_pixmo --source HUB_DIR --images IMAGES [--dataset pixmo-points ...] [--workers 16]
    python -m tools.download_pixmo --urls urls.txt --images IMAGES      # lines "URL" or "URL SHA256"

Every `image_url` of the parquet files under --source (optionally only those below a folder named after
one of --dataset) is fetched once; the file is named by the hex SHA-256 of the URL (UTF-8) and holds the
response bytes unchanged. Where the rows give `image_sha256`, the bytes must match it; elsewhere they must
at least open as an image. Writes are atomic (temporary file + rename), so an interrupted run leaves no
partial files and a rerun skips what is there: the command is resumable. URLs that failed (HTTP error,
timeout, wrong sha256, not an image) get a note in IMAGES/.failed/<name> with the reason and are not
retried unless --retry-failed; the builders report them as "download failed".

Requests: HTTP(S) GET, `--timeout` seconds (default 5), up to `--retries` retries (default 3) on
connection errors, timeouts and HTTP 429, sleeping backoff * 2^k seconds between tries (default 1).
URLs are de-duplicated, sorted and shuffled with a fixed seed (58713) to spread the load over hosts.
Prints the counts at the end; exits 0 even when URLs fail (link rot is expected), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import http.client
import io
import os
import pathlib
import random
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request

FAILED_DIR = ".failed"
SHUFFLE_SEED = 58713
USER_AGENT = "molmo_jax-download_pixmo/1.0"


class DownloadError(Exception):
    """A URL that gave no usable image; the message is the (short) reason."""


def url_filename(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def collect_urls(source: str | None, datasets: list[str], urls_file: str | None) -> dict[str, str | None]:
    """{url: expected sha256 or None}: the last sha seen for a URL wins, as in the original."""
    wanted: dict[str, str | None] = {}
    if urls_file:
        with open(urls_file, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if parts:
                    wanted[parts[0]] = parts[1].lower() if len(parts) > 1 else wanted.get(parts[0])
    if source:
        import pyarrow.parquet as pq

        root = pathlib.Path(source)
        for path in sorted(root.rglob("*.parquet")):
            folders = path.relative_to(root).parts[:-1]
            if datasets and not any(f == d or f.endswith("--" + d) for f in folders for d in datasets):
                continue
            names = pq.read_schema(path).names
            if "image_url" not in names:
                continue
            columns = ["image_url"] + (["image_sha256"] if "image_sha256" in names else [])
            table = pq.read_table(path, columns=columns).to_pydict()
            shas = table.get("image_sha256") or [None] * len(table["image_url"])
            for url, sha in zip(table["image_url"], shas):
                if url:
                    wanted[url] = sha.lower() if sha else wanted.get(url)
    return wanted


def _is_image(data: bytes) -> bool:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        return width > 0 and height > 0
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images
        return False


def fetch(url: str, timeout: float, retries: int, backoff: float) -> bytes:
    """The response body; DownloadError after the retries are spent or on a non-retried error."""
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError("not an http(s) URL")
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    for attempt in range(retries + 1):
        retry_reason = None
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            if error.code != 429:
                raise DownloadError(f"HTTP {error.code}") from None
            retry_reason = "HTTP 429"
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, TimeoutError,
                ConnectionError) as error:
            reason = getattr(error, "reason", error)
            retry_reason = "timeout" if isinstance(reason, (socket.timeout, TimeoutError)) \
                else f"connection error ({type(reason).__name__})"
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise DownloadError(retry_reason)


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def download_one(url: str, sha: str | None, images: pathlib.Path, args) -> str:
    """Outcome of one URL: "present", "downloaded", "failed earlier" or "failed: <reason>"."""
    name = url_filename(url)
    target, marker = images / name, images / FAILED_DIR / name
    if target.is_file() and target.stat().st_size > 0:
        if not sha or hashlib.sha256(target.read_bytes()).hexdigest() == sha:
            return "present"
    if marker.is_file() and not args.retry_failed:
        return "failed earlier"
    try:
        data = fetch(url, args.timeout, args.retries, args.backoff)
        if sha and hashlib.sha256(data).hexdigest() != sha:
            raise DownloadError("sha256 mismatch")
        if not sha and not _is_image(data):
            raise DownloadError("not an image")
    except DownloadError as error:
        _write_atomic(marker, f"{url}\n{error}\n".encode())
        if target.is_file():
            target.unlink()  # an old file whose bytes no longer match
        return f"failed: {error}"
    _write_atomic(target, data)
    if marker.is_file():
        marker.unlink()
    return "downloaded"


def run(args) -> collections.Counter:
    images = pathlib.Path(args.images)
    (images / FAILED_DIR).mkdir(parents=True, exist_ok=True)
    wanted = collect_urls(args.source, args.dataset, args.urls)
    order = sorted(wanted)
    random.Random(SHUFFLE_SEED).shuffle(order)
    if args.limit:
        order = order[:args.limit]
    counts: collections.Counter = collections.Counter()
    print(f"{len(order)} image URLs", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(download_one, url, wanted[url], images, args) for url in order]
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            counts[future.result()] += 1
            if args.progress and done % args.progress == 0:
                print(f"{done}/{len(order)} done", file=sys.stderr)
    return counts


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m tools.download_pixmo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="folder holding the Hub's parquet files (anywhere below it)")
    parser.add_argument("--urls", help="text file of URLs, one per line, optionally followed by the sha256")
    parser.add_argument("--images", required=True, help="folder to write the images into")
    parser.add_argument("--dataset", action="append", default=[],
                        help="only parquet files below a folder of this name, e.g. pixmo-points (repeatable)")
    parser.add_argument("--workers", type=int, default=16, help="parallel downloads (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default %(default)s)")
    parser.add_argument("--retries", type=int, default=3, help="retries per URL (default %(default)s)")
    parser.add_argument("--backoff", type=float, default=1.0, help="backoff factor in seconds (default %(default)s)")
    parser.add_argument("--retry-failed", action="store_true", help="try again URLs that failed in earlier runs")
    parser.add_argument("--limit", type=int, default=0, help="only the first N URLs of the shuffled order")
    parser.add_argument("--progress", type=int, default=0, metavar="N", help="print progress every N URLs")
    args = parser.parse_args(argv)
    if not args.source and not args.urls:
        parser.error("give --source (parquet files) and/or --urls (a list of URLs)")
    if args.source and not os.path.isdir(args.source):
        parser.error(f"--source {args.source!r} is not a folder")
    if args.urls and not os.path.isfile(args.urls):
        parser.error(f"--urls {args.urls!r} is not a file")
    if args.workers < 1 or args.retries < 0 or args.timeout <= 0 or args.backoff < 0:
        parser.error("--workers must be >= 1, --retries >= 0, --timeout > 0 and --backoff >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    counts = run(args)
    failed = sum(n for outcome, n in counts.items() if outcome.startswith("failed: "))
    print(f"downloaded {counts['downloaded']}, already present {counts['present']}, "
          f"failed {failed}, failed in an earlier run (not retried) {counts['failed earlier']}")
    for outcome, n in sorted(counts.items()):
        if outcome.startswith("failed: "):
            print(f"  {n}: {outcome[len('failed: '):]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
