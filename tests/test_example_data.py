"""Fetching the CUSA authors' example data, against local mirrors only (a file:// folder and a server on 127.0.0.1)."""

import functools
import hashlib
import http.server
import json
import threading

import pytest
from PIL import Image

from cusa_hf.data import load_json_dataset
from cusa_hf.example_data import (
    DEFAULT_BASE_URL,
    ExampleDataUnavailable,
    fetch_example_data,
    read_manifest,
)


def write_mirror(folder):
    """A tiny copy of the authors' dataset_example/ layout: pics/*.jpg and new_{train,val,test}.json, with its
    manifest."""
    (folder / "pics").mkdir(parents=True)
    records = {}
    for split, names in (("train", ["a", "b"]), ("val", ["c"]), ("test", ["d"])):
        records[split] = []
        for index, name in enumerate(names):
            Image.new("RGB", (40 + index, 30), (40 * index, 90, 200)).save(folder / "pics" / f"COCO_{name}.jpg")
            for caption in (f"a picture {name}", f"another view of {name}"):
                records[split].append({"image_path": f"./pics/COCO_{name}.jpg", "caption": caption,
                                       "image_id": f"COCO_{name}.jpg"})  # fmt: skip
        (folder / f"new_{split}.json").write_text(json.dumps(records[split]))
    lines = ["# test mirror"]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {len(data)}  {path.relative_to(folder).as_posix()}")
    manifest = folder.parent / "manifest.sha256"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_the_shipped_manifest_lists_the_authors_files_at_a_pinned_commit():
    entries = read_manifest()
    assert len(entries) == 1005 and {e.path for e in entries} >= {"new_train.json", "new_val.json", "new_test.json"}
    assert sum(e.path.startswith("pics/") for e in entries) == 1002
    assert "58e872150a567832ab3c4a8e167c54ee21ff6a0e" in DEFAULT_BASE_URL


def test_fetch_from_a_file_mirror_checks_converts_and_loads(tmp_path):
    mirror = tmp_path / "mirror"
    manifest = write_mirror(mirror)
    folder = fetch_example_data(tmp_path / "data", base_url=mirror.as_uri(), manifest=manifest, show_progress=False)
    train = load_json_dataset(folder / "train.json", image_root=folder)
    assert len(train) == 4 and set(train["image_id"]) == {"COCO_a.jpg", "COCO_b.jpg"}
    assert json.loads((folder / "test.json").read_text())[0]["image"] == "images/COCO_d.jpg"
    assert len(load_json_dataset(folder / "validation.json", image_root=folder)) == 2
    # Complete: a second call needs no source at all.
    assert fetch_example_data(folder, base_url="http://127.0.0.1:9/none", manifest=manifest) == folder


def test_a_corrupt_download_is_deleted_and_refused(tmp_path):
    mirror = tmp_path / "mirror"
    manifest = write_mirror(mirror)
    (mirror / "pics" / "COCO_c.jpg").write_bytes(b"not the listed bytes")
    with pytest.raises(ValueError, match="COCO_c.jpg: downloaded file does not match the expected checksum"):
        fetch_example_data(tmp_path / "data", base_url=mirror.as_uri(), manifest=manifest, show_progress=False)
    assert not list((tmp_path / "data").rglob("*.part"))
    assert (tmp_path / "data" / "images" / "COCO_a.jpg").is_file()  # files checked before it are kept


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, honours ``Range: bytes=N-`` (206) and records the requests."""

    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        RangeHandler.requests.append((self.path, self.headers.get("Range")))
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def server(tmp_path):
    mirror = tmp_path / "mirror"
    manifest = write_mirror(mirror)
    handler = functools.partial(RangeHandler, directory=str(mirror))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", mirror, manifest
    httpd.shutdown()
    httpd.server_close()


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    url, mirror, manifest = server
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    whole = (mirror / "pics" / "COCO_b.jpg").read_bytes()
    (data / "images" / "COCO_b.jpg.part").write_bytes(whole[:100])  # killed after 100 bytes
    folder = fetch_example_data(data, base_url=url, manifest=manifest, show_progress=False)
    assert (folder / "images" / "COCO_b.jpg").read_bytes() == whole
    assert ("/pics/COCO_b.jpg", "bytes=100-") in RangeHandler.requests
    assert all(range_ is None for path, range_ in RangeHandler.requests if path != "/pics/COCO_b.jpg")


def test_an_unreachable_source_says_so(server, tmp_path):
    url, mirror, manifest = server
    with pytest.raises(ExampleDataUnavailable, match="HTTP 404"):
        fetch_example_data(tmp_path / "data", base_url=url + "missing/", manifest=manifest, show_progress=False)
    with pytest.raises(ExampleDataUnavailable, match="cannot fetch http://127.0.0.1:9/"):
        fetch_example_data(tmp_path / "data", base_url="http://127.0.0.1:9/", manifest=manifest, show_progress=False)
