"""A stand-in Hugging Face Hub for tests: an HTTP server on 127.0.0.1 serving local directories as model
repositories, so that the real `huggingface_hub` client downloads from it when given `endpoint=` (or HF_ENDPOINT).

It answers the requests of the two calls raystack makes (raystack.models.sources.fetch_from_hub), as
huggingface_hub 2.4 sends them:
  GET  /api/models/{repo_id}/revision/{rev}       huggingface_hub.hf_api.HfApi.model_info, through repo_info, from
                                                 huggingface_hub._snapshot_download.snapshot_download: "sha", "siblings"
  GET  /api/models/{repo_id}[?blobs=true]        HfApi.model_info(files_metadata=True), the file sizes that size a
                                                 model without its config.json: "siblings" with "size", "blobId" and,
                                                 for LFS files, "lfs" {sha256, size, pointerSize}, as the hub adds them
  GET  /api/models/{repo_id}/tree/{rev}[/path]    huggingface_hub.hf_api.HfApi.list_repo_tree (?recursive=true), the
                                                 file list snapshot_download fetches: one page, no Link header
  HEAD /{repo_id}/resolve/{rev}/{filename}        huggingface_hub.file_download.get_hf_file_metadata, for every
                                                 hf_hub_download: X-Repo-Commit, ETag (git blob sha1) and, for LFS
                                                 files, X-Linked-Etag (sha256) and X-Linked-Size, as the hub sends
                                                 them; answered directly (no CDN redirect) and without Xet headers,
                                                 so the client takes its plain HTTP path
  GET  /{repo_id}/resolve/{rev}/{filename}        huggingface_hub.file_download.http_get: the bytes; `Range: bytes=N-`
                                                 (a resumed download) is answered 206
and, for the same directories as ModelScope repositories (modelscope 1.40's HubApi.get_model_files, through
modelscope_hub._legacy_api.LegacyClient._list_files_page; the client is given the address as MODELSCOPE_ENDPOINT):
  GET  /api/v1/models/{repo_id}/repo/files?Revision=master&Recursive=False|True
                                                 {"Code": 200, "Data": {"Files": [{"Name", "Path", "Size", "Type":
                                                 "blob"|"tree", "Sha256", "IsLFS", "Revision"}]}, "Success": true};
                                                 an unknown repository is a 404 with ModelScope's error body
A revision is "main" or the repository's commit sha, a hash of its file list and contents. Errors carry the
X-Error-Code that huggingface_hub.utils._http.hf_raise_for_status turns into its exceptions: RepoNotFound
(RepositoryNotFoundError; 401 without a token, 404 with one, as the hub answers), RevisionNotFound, EntryNotFound.
A top-level .git/ or .cache/ (huggingface_hub's local_dir metadata) is not repository content.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Stored in Git LFS on the hub: the default .gitattributes patterns for weights, and anything over 10 MiB.
LFS_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model", ".npz"}
LFS_MIN_SIZE = 10 * 1024 * 1024
NOT_CONTENT = {".git", ".cache"}
API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
MODELSCOPE_FILES = re.compile(r"/api/v1/models/(?P<repo>[^/]+/[^/]+)/repo/files")


class HubStandIn:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo_id: Path(path) for repo_id, path in repos.items()}  # read at every request
        self.url = ""
        self._lock = threading.Lock()
        self._downloads: Counter[tuple[str, str]] = Counter()
        self._blobs: dict[tuple, dict] = {}  # (path, size, mtime) -> its tree entry, hashed once
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def downloads(self, repo_id: str, filename: str) -> int:
        """How many times the content of `filename` (repo-relative, "/"-separated) was served by a GET."""
        with self._lock:
            return self._downloads[(repo_id, filename)]

    def start(self) -> HubStandIn:
        self._server = _Server(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _files(self, repo_id: str) -> dict[str, Path] | None:
        root = self.repos.get(repo_id)
        if root is None or not root.is_dir():
            return None
        rel = ((p.relative_to(root), p) for p in sorted(root.rglob("*")))
        return {r.as_posix(): p for r, p in rel if r.parts[0] not in NOT_CONTENT and p.is_file()}

    def _blob(self, path: Path) -> dict:
        """A file's tree entry: size, git blob oid and, for an LFS file, the LFS pointer's data."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._blobs:
                return self._blobs[key]
        data = path.read_bytes()
        entry: dict = {"type": "file", "size": len(data)}
        if path.suffix in LFS_SUFFIXES or len(data) >= LFS_MIN_SIZE:
            sha256 = hashlib.sha256(data).hexdigest()
            data = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
            entry["lfs"] = {"oid": sha256, "size": entry["size"], "pointerSize": len(data)}  # git holds the pointer
        entry["oid"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        with self._lock:
            self._blobs[key] = entry
        return entry

    def _served(self, repo_id: str, filename: str) -> None:
        with self._lock:
            self._downloads[(repo_id, filename)] += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients at once: Ray nodes, each with snapshot_download's 8 workers


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: a connection per request, so nothing is served once stop() has closed the listening socket.
    hub: HubStandIn

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {key.lower(): values[0].lower() for key, values in parse_qs(url.query).items()}
        if m := MODELSCOPE_FILES.fullmatch(url.path):
            self._modelscope_files(unquote(m["repo"]), query.get("recursive") in ("true", "1"))
        elif m := API.fullmatch(url.path):
            self._api(m, query.get("recursive") in ("true", "1"), query.get("blobs") in ("true", "1"))
        elif m := RESOLVE.fullmatch(url.path):
            self._resolve(m)
        else:
            self._send(404, {"error": "Sorry, we can't find the page you are looking for."})

    do_HEAD = do_GET  # same answers, without a body

    def _repo(self, m: re.Match) -> tuple[str, dict[str, Path], str] | None:
        repo_id, revision = unquote(m["repo"]), unquote(m["rev"] or "main")
        if (files := self.hub._files(repo_id)) is None:
            status = 404 if "Authorization" in self.headers else 401
            self._send(status, {"error": "Repository not found"}, "RepoNotFound")
            return None
        sha = hashlib.sha1("".join(f"{n} {self.hub._blob(p)['oid']}\n" for n, p in files.items()).encode()).hexdigest()
        if revision not in ("main", sha):
            self._send(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
            return None
        return repo_id, files, sha

    def _api(self, m: re.Match, recursive: bool, blobs: bool) -> None:
        if (found := self._repo(m)) is None:
            return
        repo_id, files, sha = found
        entries = {name: {**self.hub._blob(p), "path": name} for name, p in files.items()}
        if m["kind"] != "tree":  # model_info
            siblings = [{"rfilename": n} | ({"size": e["size"], "blobId": e["oid"]} if blobs else {})
                        | ({"lfs": {"sha256": e["lfs"]["oid"], "size": e["lfs"]["size"],
                                    "pointerSize": e["lfs"]["pointerSize"]}} if blobs and "lfs" in e else {})
                        for n, e in entries.items()]
            self._send(200, {"_id": sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
                             "sha": sha, "private": False, "gated": False, "disabled": False, "downloads": 0,
                             "likes": 0, "tags": [], "siblings": siblings})
            return
        for name in files:  # the folders, as the hub lists them too
            parts = name.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                            "size": 0, "path": folder})
        base = unquote(m["path"] or "").strip("/")
        prefix = base + "/" if base else ""
        listing = [e for n, e in sorted(entries.items()) if n.startswith(prefix)
                   and (recursive or "/" not in n[len(prefix):])]
        if base and base not in entries:
            self._send(404, {"error": f'{base} does not exist on "{unquote(m["rev"])}"'}, "EntryNotFound")
        else:
            self._send(200, listing)

    def _modelscope_files(self, repo_id: str, recursive: bool) -> None:
        if (files := self.hub._files(repo_id)) is None:
            self._send(404, {"Code": 10010205001, "Message": f"model {repo_id} not exists", "Success": False})
            return
        blobs = {name: self.hub._blob(p) for name, p in files.items() if recursive or "/" not in name}
        listing = [{"Name": name.rsplit("/", 1)[-1], "Path": name, "Size": blob["size"], "Type": "blob",
                    "Sha256": blob.get("lfs", {}).get("oid", ""), "IsLFS": "lfs" in blob, "Revision": "master"}
                   for name, blob in blobs.items()]
        folders = sorted({name.split("/")[0] for name in files if "/" in name})
        listing += [{"Name": f, "Path": f, "Size": 0, "Type": "tree", "Revision": "master"} for f in folders]
        self._send(200, {"Code": 200, "Data": {"Files": listing}, "Message": "success", "Success": True})

    def _resolve(self, m: re.Match) -> None:
        if (found := self._repo(m)) is None:
            return
        repo_id, files, sha = found
        if (filename := unquote(m["path"])) not in files:
            self._send(404, {"error": "Entry not found"}, "EntryNotFound", {"X-Repo-Commit": sha})
            return
        entry = self.hub._blob(files[filename])
        size = entry["size"]
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if "lfs" in entry:
            headers |= {"ETag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Etag": f'"{entry["lfs"]["oid"]}"',
                        "X-Linked-Size": str(size)}
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        start, end, status = 0, size - 1, 200
        if r := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip()):
            start, end, status = int(r[1]), min(int(r[2] or size - 1), size - 1), 206
            if start >= size:
                self._send(416, b"", headers={"Content-Range": f"bytes */{size}"})
                return
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._head(status, headers | {"Content-Length": str(end - start + 1)})
        if self.command != "GET":
            return
        self.hub._served(repo_id, filename)
        try:
            with open(files[filename], "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0 and (chunk := f.read(min(1 << 20, left))):
                    self.wfile.write(chunk)
                    left -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-download (it resumes with Range)
            pass

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send(self, status: int, body, code: str = "", headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data))} | (headers or {})
        if code:
            headers |= {"X-Error-Code": code, "X-Error-Message": body["error"]}
        self._head(status, headers)
        if self.command == "GET":
            self.wfile.write(data)


if __name__ == "__main__":  # self-check, from the repository root: python -m tests.hub_standin
    import os
    import shutil
    import sys
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    tmp = Path(tempfile.mkdtemp(prefix="hub-standin-"))
    os.environ |= {"HF_HOME": str(tmp / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):  # the library's own endpoint stays huggingface.co
        os.environ.pop(key, None)
    hosts: set[str] = set()  # every host this process looks up or connects to, from now on

    def audit(event: str, args: tuple) -> None:
        if event == "socket.getaddrinfo":
            hosts.add(str(args[0]))
        elif event == "socket.connect":
            hosts.add(str(args[1][0] if isinstance(args[1], tuple) else args[1]))

    sys.addaudithook(audit)
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    repo = tmp / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "llama"}\n')
    (repo / "model.safetensors").write_bytes(os.urandom(8192))
    (repo / "sub" / "tokenizer.json").write_text('{"version": "1.0"}\n')
    names = ["config.json", "model.safetensors", "sub/tokenizer.json"]

    def check(out: Path, files: list[str]) -> None:
        got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts)
        assert got == files and all((out / f).read_bytes() == (repo / f).read_bytes() for f in files), (out, got)

    with HubStandIn({"Org/Tiny": repo}) as hub:
        def snapshot(out: Path, repo_id: str = "Org/Tiny") -> str:
            return huggingface_hub.snapshot_download(repo_id=repo_id, local_dir=str(out), endpoint=hub.url)

        def config(out: Path, repo_id: str = "Org/Tiny") -> str:
            return huggingface_hub.hf_hub_download(repo_id=repo_id, filename="config.json", local_dir=str(out),
                                                   endpoint=hub.url)

        def counts() -> list[int]:
            return [hub.downloads("Org/Tiny", name) for name in names]

        snapshot(tmp / "a")
        check(tmp / "a", names)
        assert counts() == [1, 1, 1], counts()
        config(tmp / "b")
        check(tmp / "b", ["config.json"])
        assert counts() == [2, 1, 1], counts()
        snapshot(tmp / "a")  # up to date at the same commit sha: nothing is fetched again
        assert counts() == [2, 1, 1], counts()
        with ThreadPoolExecutor(4) as pool:  # several nodes at once
            list(pool.map(snapshot, [tmp / f"c{i}" for i in range(4)]))
        for i in range(4):
            check(tmp / f"c{i}", names)
        assert counts() == [6, 5, 5], counts()
        for call in (snapshot, config):
            try:
                call(tmp / "missing", "Org/Missing")
                raise AssertionError(f"{call.__name__} of an unknown repository succeeded")
            except RepositoryNotFoundError as err:
                print(f"unknown repo, {call.__name__}: {type(err).__name__}: {str(err).splitlines()[0]}")
    assert hosts <= {"127.0.0.1"}, f"contacted beyond loopback: {hosts}"
    print(f"hub_standin: OK with huggingface_hub {huggingface_hub.__version__} (snapshot_download, hf_hub_download: "
          f"byte-identical, download counts {counts()}; hosts contacted: {sorted(hosts)})")
    shutil.rmtree(tmp)
