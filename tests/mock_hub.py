"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests and scripts/full_scale.py (point HF_ENDPOINT at it).

It answers what huggingface_hub 2.x asks for `model_info`, `get_safetensors_metadata`, `hf_hub_download` and
`snapshot_download`, and nothing else:
- GET /api/models/{repo}[/revision/{rev}]: the repo's info (`sha`, `siblings`, with sizes when `?blobs=true`);
- GET /api/models/{repo}/tree/{rev}: the file list snapshot_download reads (one page, no `Link` header);
- HEAD and GET /{repo}/resolve/{rev}/{file}: the file, with `X-Repo-Commit` (huggingface_hub refuses a response
  without it), an `ETag`, the size as `Content-Length`, and byte ranges (206 + `Content-Range`) for the safetensors
  headers and resumed downloads. No `X-Xet-Hash` header, so the plain HTTP download is used;
- anything unknown: 404 with the `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) that
  huggingface_hub turns into its typed errors. (huggingface_hub also fetches /api/agent-harnesses once,
  best effort: the 404 is ignored.)

A file is anything with a size, an etag and `chunks(start, end)`: a file on disk, or one generated on the fly
(tests/synthetic_checkpoint.py), so a 61 GB checkpoint can be served without being written anywhere.
"""

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK_BYTES = 1 << 20


class RepoFile(Protocol):
    size: int
    etag: str

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes [start, end) in pieces."""


@dataclass
class DiskFile:
    path: Path

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def etag(self) -> str:
        return hashlib.sha1(f"{self.path}:{self.size}:{self.path.stat().st_mtime_ns}".encode()).hexdigest()

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(start)
            while start < end:
                data = f.read(min(CHUNK_BYTES, end - start))
                if not data:
                    return
                start += len(data)
                yield data


@dataclass
class BytesFile:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        return hashlib.sha1(self.data).hexdigest()

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        yield self.data[start:end]


@dataclass
class Repo:
    files: dict[str, RepoFile]
    sha: str = "0123456789abcdef0123456789abcdef01234567"

    @classmethod
    def from_dir(cls, path: Path) -> "Repo":
        return cls({p.name: DiskFile(p) for p in sorted(Path(path).iterdir()) if p.is_file()})

    def write_to(self, dst: Path) -> Path:
        """The repo as a local directory (what `hf download` would give)."""
        dst.mkdir(parents=True, exist_ok=True)
        for name, file in self.files.items():
            with open(dst / name, "wb") as f:
                for chunk in file.chunks(0, file.size):
                    f.write(chunk)
        return dst


@dataclass
class Request:
    method: str
    path: str
    range: str | None

    @property
    def file(self) -> str | None:
        """The file a resolve request asks for."""
        match = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", self.path)
        return match.group(1) if match else None


@dataclass
class MockHub:
    """The server; `with MockHub({"Qwen/Qwen3-30B-A3B": repo}) as hub:` serves on hub.url until the block ends."""

    repos: dict[str, Repo] = field(default_factory=dict)
    # file name -> bytes a whole-file GET stops after (the HEAD still gives the whole size): a cut-short download.
    cut_short: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def __enter__(self) -> "MockHub":
        hub = self

        Handler = type("Handler", (_Handler,), {"hub": hub})  # a handler class of this hub's own
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def downloads(self) -> list[str]:
        """Files fetched whole (GETs without a Range header), in order."""
        return [r.file for r in self.requests if r.method == "GET" and r.file and r.range is None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: MockHub

    def log_message(self, format, *args) -> None:
        """Quiet: the tests read hub.requests instead of the log."""

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append(Request(self.command, path, self.headers.get("Range")))
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo = self._repo(match.group(1), match.group(2) or "main")
            if repo:
                blobs = parse_qs(url.query).get("blobs", [""])[0].lower() == "true"
                self._json(self._info(match.group(1), repo, blobs), body)
        elif match := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            repo = self._repo(match.group(1), match.group(2))
            if repo:
                self._json([{"type": "file", "path": name, "size": f.size, "oid": f.etag}
                            for name, f in repo.files.items()], body)
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self._repo(match.group(1), match.group(2))
            if repo:
                file = repo.files.get(match.group(3))
                if file is None:
                    self._error("EntryNotFound", repo.sha)
                else:
                    self._file(repo, match.group(3), file, body)
        else:
            self._error("RepoNotFound")

    def _repo(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error("RepoNotFound")
        elif revision not in ("main", repo.sha):
            self._error("RevisionNotFound")
        else:
            return repo
        return None

    @staticmethod
    def _info(repo_id: str, repo: Repo, blobs: bool) -> dict:
        siblings = [{"rfilename": name, **({"size": f.size, "blobId": f.etag} if blobs else {})}
                    for name, f in repo.files.items()]
        return {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False, "gated": False,
                "disabled": False, "tags": [], "siblings": siblings}

    def _json(self, data, body: bool) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _error(self, code: str, sha: str | None = None) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        if sha:
            self.send_header("X-Repo-Commit", sha)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(self, repo: Repo, name: str, file: RepoFile, body: bool) -> None:
        start, end, status = 0, file.size, 200
        if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start = int(match.group(1))
            end = min(file.size, int(match.group(2)) + 1) if match.group(2) else file.size
            status = 206
        if body and name in self.hub.cut_short and "Range" not in self.headers:
            end = min(end, self.hub.cut_short[name])
        self.send_response(status)
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("ETag", f'"{file.etag}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(max(end - start, 0)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{file.size}")
        self.end_headers()
        if body:
            for chunk in file.chunks(start, end):
                self.wfile.write(chunk)
