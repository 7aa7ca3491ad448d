"""A tiny stand-in for the Hugging Face Hub HTTP API, on 127.0.0.1, for tests.

It implements just what huggingface_hub's HfApi.create_repo / create_branch / model_info / upload_folder
(preupload + commit, every file as a "regular" upload, so no LFS or Xet storage is involved) and
snapshot_download (tree listing, HEAD/GET on /resolve/) send, records every request, and keeps the repos
in memory. Point the client at it with HF_ENDPOINT=<FakeHub.url>.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str  # unquoted path, without the query
    query: dict
    headers: dict  # lower-case names
    body: bytes
    status: int = 0

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def is_write(self) -> bool:
        return self.method not in ("GET", "HEAD")


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    branches: dict = field(default_factory=dict)  # name -> commit oid
    commits: dict = field(default_factory=dict)  # oid -> {path: bytes}
    messages: dict = field(default_factory=dict)  # oid -> commit summary


class HubError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = "", **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class FakeHub:
    """``with FakeHub(token) as hub:`` serves on ``hub.url`` for at most ``lifetime`` seconds."""

    def __init__(self, token: str, lifetime: float = 120.0):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._n = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                hub._serve(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._timer = threading.Timer(lifetime, self.close)
        self._timer.daemon = True

    # ------------------------------------------------------------------ lifetime

    def __enter__(self):
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._timer.cancel()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ repos

    def _oid(self, seed: bytes) -> str:
        self._n += 1
        return hashlib.sha1(seed + str(self._n).encode()).hexdigest()

    def add_repo(self, repo_id: str, files: dict, private: bool = False, gated: bool = False,
                 branch: str = "main") -> str:
        """Create (or add a commit on ``branch`` of) a repo holding ``files`` (path -> bytes/str)."""
        repo = self.repos.setdefault(repo_id, Repo(private=private, gated=gated))
        tree = {p: (c.encode() if isinstance(c, str) else bytes(c)) for p, c in files.items()}
        oid = self._oid(repo_id.encode() + branch.encode())
        repo.commits[oid] = tree
        repo.messages[oid] = "initial"
        repo.branches[branch] = oid
        return oid

    def files(self, repo_id: str, revision: str = "main") -> dict:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[revision]]

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.is_write]

    def downloaded(self) -> list[str]:
        """Paths of files whose content was fetched (GET on /resolve/)."""
        out = []
        for r in self.requests:
            parts = r.path.strip("/").split("/")
            if r.method == "GET" and len(parts) > 4 and parts[2] == "resolve":
                out.append("/".join(parts[4:]))
        return out

    # ------------------------------------------------------------------ HTTP

    def _authorized(self, headers: dict) -> bool:
        return headers.get("authorization") == f"Bearer {self.token}"

    def _serve(self, h: BaseHTTPRequestHandler):
        split = urlsplit(h.path)
        headers = {k.lower(): v for k, v in h.headers.items()}
        body = b""
        if "content-length" in headers:
            body = h.rfile.read(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(h.rfile.readline().split(b";")[0], 16)
                chunk = h.rfile.read(size)
                h.rfile.readline()
                if size == 0:
                    break
                body += chunk
        req = Request(h.command, unquote(split.path), parse_qs(split.query), headers, body)
        with self.lock:
            self.requests.append(req)
        segments = [unquote(s) for s in split.path.strip("/").split("/")]
        try:
            with self.lock:
                status, out_headers, payload = self._route(h.command, segments, req)
        except HubError as err:
            status, payload = err.status, json.dumps({"error": err.message, **err.extra}).encode()
            out_headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
            if err.code:
                out_headers["X-Error-Code"] = err.code
        req.status = status
        h.send_response(status)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
            out_headers.setdefault("Content-Type", "application/json")
        out_headers.setdefault("Content-Length", str(len(payload)))
        for k, v in out_headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)

    def _repo(self, repo_id: str, headers: dict, write: bool = False) -> Repo:
        if write and not self._authorized(headers):
            raise HubError(401, None, "Invalid credentials in Authorization header")
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized(headers)):
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, "RevisionNotFound", "Invalid rev id: " + revision)

    def _route(self, method: str, seg: list[str], req: Request):
        h = req.headers
        # POST /api/repos/create
        if method == "POST" and seg == ["api", "repos", "create"]:
            if not self._authorized(h):
                raise HubError(401, None, "Invalid credentials in Authorization header")
            payload = req.json
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo_id in self.repos:
                raise HubError(409, None, "You already created this model repo", url=f"{self.url}/{repo_id}")
            private = payload.get("visibility") == "private" or payload.get("private") is True
            repo = self.repos[repo_id] = Repo(private=private)
            oid = self._oid(b"init")
            repo.commits[oid] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            repo.messages[oid] = "initial commit"
            repo.branches["main"] = oid
            return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": oid[:24]}
        if method == "POST" and seg == ["api", "validate-yaml"]:
            content = req.json.get("content", "")
            if content.startswith("---"):
                try:
                    yaml.safe_load(content.split("---")[1])
                except yaml.YAMLError as err:
                    return 400, {}, {"errors": [{"message": str(err)}], "warnings": []}
            return 200, {}, {"errors": [], "warnings": []}
        # /api/models/{owner}/{name}/...
        if len(seg) >= 4 and seg[:2] == ["api", "models"]:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                repo = self._repo(repo_id, h)
                oid = self._commit(repo, rest[1] if rest else "main")
                return 200, {}, {"id": repo_id, "sha": oid, "private": repo.private,
                                 "gated": "manual" if repo.gated else False, "tags": [],
                                 "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid])]}
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                repo = self._repo(repo_id, h)
                tree = repo.commits[self._commit(repo, rest[1])]
                entries, dirs = [], set()
                for p in sorted(tree):
                    parts = p.split("/")
                    for i in range(1, len(parts)):
                        dirs.add("/".join(parts[:i]))
                    entries.append({"type": "file", "oid": git_oid(tree[p]), "size": len(tree[p]), "path": p})
                entries += [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                             "path": d} for d in sorted(dirs)]
                return 200, {}, entries
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                repo = self._repo(repo_id, h, write=True)
                tree = repo.commits[self._commit(repo, rest[1])]
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_oid(tree[f["path"]]) if f["path"] in tree else None}
                         for f in req.json["files"]]
                return 200, {}, {"files": files}
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                repo = self._repo(repo_id, h, write=True)
                branch = rest[1]
                if branch not in repo.branches:
                    raise HubError(404, "RevisionNotFound", "Invalid rev id: " + branch)
                tree = dict(repo.commits[repo.branches[branch]])
                summary = ""
                for line in req.body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "header":
                        summary = value["summary"]
                    elif item["key"] == "file":
                        assert value["encoding"] == "base64"
                        tree[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        tree.pop(value["path"], None)
                    else:
                        raise HubError(400, None, f"unsupported commit operation {item['key']}")
                oid = self._oid(req.body)
                repo.commits[oid] = tree
                repo.messages[oid] = summary
                repo.branches[branch] = oid
                return 200, {}, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                 "pullRequestUrl": None}
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                repo = self._repo(repo_id, h, write=True)
                if rest[1] in repo.branches:
                    raise HubError(409, None, "Reference already exists")
                start = (json.loads(req.body or b"{}") or {}).get("startingPoint") or "main"
                repo.branches[rest[1]] = self._commit(repo, start)
                return 200, {}, {}
        # HEAD/GET /{owner}/{name}/resolve/{revision}/{path}
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            repo_id = f"{seg[0]}/{seg[1]}"
            repo = self._repo(repo_id, h)
            if repo.gated:
                raise HubError(403, "GatedRepo", "Access to this model is restricted: you must accept its conditions")
            oid = self._commit(repo, seg[3])
            path = "/".join(seg[4:])
            tree = repo.commits[oid]
            if path not in tree:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid}, b"Entry not found"
            data = tree[path]
            return 200, {"X-Repo-Commit": oid, "ETag": f'"{git_oid(data)}"', "Content-Length": str(len(data)),
                         "Content-Type": "application/octet-stream"}, data
        raise HubError(404, None, f"fake hub: no route for {method} /{'/'.join(seg)}")
