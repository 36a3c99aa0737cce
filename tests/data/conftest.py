"""Shared fixtures: a small shapes dataset, a loopback HTTP server, and one real img2dataset run."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.download import download_images
from data.synthetic import generate_dataset


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train (30, 2 shards) and validation (8) splits of the shapes set."""
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(out, {"train": 30, "validation": 8}, seed=7, samples_per_shard=16, num_proc=1)
    return out


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a tar shard."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


class _Routes(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        status, headers, body = self.routes.get(self.path, (404, {}, b"not found"))
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@pytest.fixture(scope="session")
def http_server() -> tuple[str, dict]:
    """A 127.0.0.1 server in a thread; tests fill its routes {path: (status, headers, body)}."""
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
    handler = type("Handler", (_Routes,), {"routes": routes})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What img2dataset reports for each planted failure (its own messages).
EXPECTED_FAILURES = {
    "HTTP Error 404: Not Found": 2,
    "<urlopen error [Errno 111] Connection refused>": 1,
    "Image decoding error": 2,  # the corrupt JPEG and the HTML page
    "image area too large": 1,
    "Use of image disallowed by X-Robots-Tag directive": 1,
}
EXTRA_COLUMNS = ["group_id", "references", "qa", "negative_captions"]


@pytest.fixture(scope="session")
def img2dataset_run(shapes_dir: Path, http_server: tuple[str, dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """img2dataset, for real, on the validation shapes (served over HTTP) plus one URL per failure kind.

    The shapes keep their JSON fields through img2dataset's save_additional_columns, so loading
    its output must give the same samples as loading the generator's shards.
    """
    base, routes = http_server
    shapes = read_tar(next((shapes_dir / "validation").glob("*.tar")))
    rows = []
    for key, files in sorted(shapes.items()):
        meta = json.loads(files["json"])
        routes[f"/shapes/{key}.jpg"] = (200, {"Content-Type": "image/jpeg"}, files["jpg"])
        extra = {column: meta[column] for column in EXTRA_COLUMNS}
        rows.append({"image_url": f"{base}/shapes/{key}.jpg", "caption": meta["caption"], **extra})
    png = Image.new("RGBA", (48, 40), (10, 200, 30, 255))
    good_jpeg = encode(Image.new("RGB", (40, 40), (200, 40, 40)), "JPEG")
    planted = {
        "/good.png": (200, {"Content-Type": "image/png"}, encode(png, "PNG"), "a green png"),
        "/missing-1.jpg": (404, {}, b"nope", "gone"),
        "/missing-2.jpg": (404, {}, b"nope", "gone too"),
        "/corrupt.jpg": (200, {"Content-Type": "image/jpeg"}, good_jpeg[:20] + b"\x00" * 200, "corrupt"),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html><body>not an image</body></html>", "a web page"),
        "/huge.png": (200, {"Content-Type": "image/png"}, encode(Image.new("RGB", (700, 700), "white"), "PNG"), "huge"),
        "/noai.jpg": (200, {"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}, good_jpeg, "opted out"),
    }
    for path, (status, headers, body, caption) in planted.items():
        if status == 200:
            routes[path] = (status, headers, body)
        rows.append({"image_url": base + path, "caption": caption})
    rows.append({"image_url": f"http://127.0.0.1:{_closed_port()}/refused.jpg", "caption": "refused"})
    for row in rows:
        for column in EXTRA_COLUMNS:
            row.setdefault(column, None)
    url_list = tmp_path_factory.mktemp("urls") / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), url_list)
    output = tmp_path_factory.mktemp("img2dataset") / "shards"
    summary = download_images(
        url_list, output, image_size=64, processes_count=1, thread_count=4, number_sample_per_shard=10,
        timeout=5, max_image_area=300_000, save_additional_columns=EXTRA_COLUMNS,
    )
    return {"output": output, "summary": summary, "rows": rows, "good_urls": {base + "/good.png"} | {
        r["image_url"] for r in rows if "/shapes/" in r["image_url"]
    }}
