"""A small stand-in for the Hugging Face Hub, speaking the HTTP protocol that `huggingface_hub` 2.x uses.

The real Hub cannot be reached from the test machines, so the publishing tests start this server on 127.0.0.1 and
point `HF_ENDPOINT` at it. It keeps repositories in memory and implements only what `create_repo`, `upload_folder`
/ `create_commit` (preupload, LFS batch "basic" transfer + verify, NDJSON commit), `create_branch`, `whoami`,
`repo_info`/`model_info`, `list_repo_tree` and `hf_hub_download` (HEAD + GET on `resolve`) need, with the same
status codes and headers (`X-Error-Code`, `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size`) that the
client inspects. It never fakes success: uploaded blobs are checked against their sha256 and size, an `lfsFile`
commit line must reference an uploaded blob, and every write needs a valid token.

Xet storage is not implemented (its content-addressed store is a separate service); clients must run with
`HF_HUB_DISABLE_XET=1`, which makes `huggingface_hub` use the classic LFS upload that the Hub also accepts.

Usage:

```python
with HubServer(tokens={"hf_test": "alice"}) as hub:
    os.environ["HF_ENDPOINT"] = hub.endpoint
```
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

# Files the Hub's default `.gitattributes` routes to LFS (a subset: enough for model repos).
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".onnx",
    ".msgpack",
    ".npy",
    ".npz",
    ".pkl",
    ".zip",
    ".gz",
    ".tar",
    ".model",
)
# Like the Hub: any file above this size goes to LFS whatever its name.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
DEFAULT_GITATTRIBUTES = b"".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in LFS_SUFFIXES)
_REPO = r"(?P<repo>[^/]+/[^/]+?)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    size: int
    oid: str  # git sha1 of the content for regular files, sha256 of the content for LFS files
    lfs: bool
    content: bytes | None = None  # regular files only; LFS content lives in the blob store


@dataclass
class Commit:
    oid: str
    files: dict[str, StoredFile]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or "refs/pr/N" -> commit oid

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)


class HubError(Exception):
    """An error answered the way the Hub answers it: status, optional `X-Error-Code`, JSON `{"error": ...}`."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """In-memory Hub. `tokens` maps valid access tokens to user names (all tokens may write to their namespace).

    Args:
        tokens (`dict[str, str]`): valid tokens -> user name.
        host (`str`): interface to bind (default loopback only).
        port (`int`): 0 picks a free port.
    """

    def __init__(self, tokens: dict[str, str], host: str = "127.0.0.1", port: int = 0):
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content of uploaded LFS objects
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for debugging failed tests
        self._lock = threading.Lock()
        self._counter = 0
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer((host, port), handler)
        # LFS content is stored and served on another origin, like the Hub's CDN/S3: the client treats a redirect
        # to another origin differently (metadata comes from the redirect itself, no auth header forwarded).
        self._storage = ThreadingHTTPServer((host, 0), handler)
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def storage_endpoint(self) -> str:
        host, port = self._storage.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        for server in (self._server, self._storage):
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, name="hub-server", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._server, self._storage):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ state changes (called under the lock)

    def _new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, StoredFile], message: str) -> Commit:
        self._counter += 1
        digest = hashlib.sha1(
            json.dumps(
                [
                    repo.repo_id,
                    parent.oid if parent else None,
                    message,
                    self._counter,
                    sorted((path, f.oid) for path, f in files.items()),
                ]
            ).encode()
        ).hexdigest()
        commit = Commit(oid=digest, files=files, message=message, parent=parent.oid if parent else None)
        repo.commits[digest] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, private=private)
        # Like the Hub, a new repo starts with one commit holding the default `.gitattributes`.
        gitattributes = StoredFile(
            len(DEFAULT_GITATTRIBUTES), git_blob_sha1(DEFAULT_GITATTRIBUTES), False, DEFAULT_GITATTRIBUTES
        )
        commit = self._new_commit(repo, None, {".gitattributes": gitattributes}, "initial commit")
        repo.refs["main"] = commit.oid
        self.repos[repo_id] = repo
        return repo


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean; `hub.requests` has the log
        pass

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _json(self, status: int, payload, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(payload).encode(), headers, head=head)

    def _user(self, required: bool) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is None:
            if required:
                raise HubError(401, "You must be authenticated to access this endpoint.")
            return None
        if token not in self.hub.tokens:
            raise HubError(
                401,
                "Invalid credentials in Authorization header",
                headers={"X-Error-Message": "Invalid credentials in Authorization header"},
            )
        return self.hub.tokens[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.hub.repos.get(repo_id)
        # Like the Hub, a private repo the caller cannot see answers exactly like a missing one.
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        if write and user != repo_id.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", code="RevisionNotFound")
        return commit

    def _dispatch(self, routes) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        # The path is matched still quoted, so that a revision like `refs%2Fpr%2F1` stays one segment.
        for pattern, handler in routes:
            match = re.fullmatch(pattern, url.path)
            if match:
                arguments = {k: v if k == "rev" or v is None else unquote(v) for k, v in match.groupdict().items()}
                try:
                    with self.hub._lock:
                        handler(**arguments)
                except HubError as error:
                    headers = dict(error.headers)
                    if error.code:
                        headers["X-Error-Code"] = error.code
                    self._json(error.status, {"error": error.message}, headers, head=self.command == "HEAD")
                except Exception as error:  # a bug in this server: answer 500 instead of dropping the connection
                    self._json(500, {"error": f"{type(error).__name__}: {error}"}, head=self.command == "HEAD")
                    raise
                return
        self._json(404, {"error": f"no route for {self.command} {url.path}"})

    def do_GET(self):
        self._dispatch(
            [
                (r"/api/whoami-v2", self.whoami),
                (rf"/api/models/{_REPO}", self.repo_info),
                (rf"/api/models/{_REPO}/revision/(?P<rev>.+)", self.repo_info),
                (rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
                (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
                (r"/lfs-objects/(?P<oid>[0-9a-f]{64})", self.lfs_object),
            ]
        )

    def do_HEAD(self):
        self._dispatch(
            [
                (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
                (r"/lfs-objects/(?P<oid>[0-9a-f]{64})", self.lfs_object),
            ]
        )

    def do_POST(self):
        self._dispatch(
            [
                (r"/api/repos/create", self.create_repo),
                (r"/api/validate-yaml", self.validate_yaml),
                (rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", self.preupload),
                (rf"/api/models/{_REPO}/commit/(?P<rev>.+)", self.commit),
                (rf"/api/models/{_REPO}/branch/(?P<branch>.+)", self.create_branch),
                (rf"/{_REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
                (rf"/lfs-verify/{_REPO}", self.lfs_verify),
            ]
        )

    def do_PUT(self):
        self._dispatch([(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload)])

    # ------------------------------------------------------------------ endpoints

    def whoami(self):
        user = self._user(required=True)
        self._json(200, {"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}, "orgs": []})

    def create_repo(self):
        user = self._user(required=True)
        payload = json.loads(self._body())
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test server only hosts model repos")
        namespace = payload.get("organization") or user
        name = payload.get("name", "")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,95}", name):
            raise HubError(400, f"Invalid repo name {name!r}")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        if repo_id in self.hub.repos:
            # The Hub's 409 still carries the repo url: `create_repo(exist_ok=True)` returns it.
            self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.endpoint}/{repo_id}"})
            return
        self.hub.create_repo(repo_id, private=payload.get("visibility") == "private")
        self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        payload = json.loads(self._body())
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                errors.append({"message": f"YAML parse error: {error}"})
            else:
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def repo_info(self, repo: str, rev: str = "main"):
        stored = self._repo(repo)
        commit = self._commit(stored, rev)
        self._json(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": commit.oid,
                "private": stored.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": "transformers",
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            },
        )

    def tree(self, repo: str, rev: str, path: str | None = None):
        commit = self._commit(self._repo(repo), rev)
        prefix = f"{path.strip('/')}/" if path else ""
        if prefix and not any(name.startswith(prefix) for name in commit.files):
            raise HubError(404, f"{path} does not exist on {unquote(rev)}", code="EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for name, stored in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {
                "type": "file",
                "path": name,
                "size": stored.size,
                "oid": stored.oid if not stored.lfs else git_blob_sha1(_lfs_pointer(stored)),
            }
            if stored.lfs:
                entry["lfs"] = {"oid": stored.oid, "size": stored.size, "pointerSize": len(_lfs_pointer(stored))}
            entries.append(entry)
        entries += [{"type": "directory", "path": folder, "oid": "0" * 40, "size": 0} for folder in sorted(folders)]
        self._json(200, entries)

    def resolve(self, repo: str, rev: str, path: str):
        head = self.command == "HEAD"
        stored_repo = self._repo(repo)
        commit = self._commit(stored_repo, rev)
        stored = commit.files.get(path)
        if stored is None:
            # The client caches "this file does not exist at this commit", keyed by X-Repo-Commit.
            raise HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid}
        if stored.lfs:
            # Like the Hub, LFS content is served from elsewhere (a CDN there): redirect, and describe the target.
            headers.update(
                {
                    "Location": f"{self.hub.storage_endpoint}/lfs-objects/{stored.oid}",
                    "X-Linked-Etag": f'"{stored.oid}"',
                    "X-Linked-Size": str(stored.size),
                    "ETag": f'"{git_blob_sha1(_lfs_pointer(stored))}"',
                }
            )
            self._send(302, b"", headers, head=head)
            return
        headers["ETag"] = f'"{stored.oid}"'
        self._send(200, stored.content, headers, content_type="application/octet-stream", head=head)

    def lfs_object(self, oid: str):
        content = self.hub.blobs.get(oid)
        if content is None:
            raise HubError(404, "no such object")
        self._send(
            200, content, {"ETag": f'"{oid}"'}, content_type="application/octet-stream", head=self.command == "HEAD"
        )

    def preupload(self, repo: str, rev: str):
        stored_repo = self._repo(repo, write=True)
        create_pr = self.query.get("create_pr", ["0"])[0] == "1"
        commit = None if create_pr else self._commit(stored_repo, rev)
        payload = json.loads(self._body())
        answers = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            is_lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > LFS_SIZE_THRESHOLD or b"\0" in sample
            existing = commit.files.get(item["path"]) if commit else None
            answers.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing else None,
                }
            )
        self._json(200, {"files": answers, "commitOid": commit.oid if commit else None})

    def lfs_batch(self, repo: str):
        self._repo(repo, write=True)
        auth = self.headers.get("Authorization", "")
        payload = json.loads(self._body())
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "this server only accepts 'upload' with the 'basic' transfer")
        objects = []
        for item in payload["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.hub.blobs:
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.storage_endpoint}/lfs-upload/{item['oid']}?size={item['size']}"},
                    "verify": {
                        "href": f"{self.hub.endpoint}/lfs-verify/{quote(repo)}",
                        "header": {"Authorization": auth},
                    },
                }
            objects.append(answer)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def lfs_upload(self, oid: str):
        # Stands in for the pre-signed storage URL: checks the content really is what the batch call announced.
        content = self._body()
        expected_size = int(self.query.get("size", [-1])[0])
        if hashlib.sha256(content).hexdigest() != oid or len(content) != expected_size:
            raise HubError(400, f"uploaded content does not match oid {oid} / size {expected_size}")
        self.hub.blobs[oid] = content
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, repo: str):
        self._repo(repo, write=True)
        payload = json.loads(self._body())
        content = self.hub.blobs.get(payload["oid"])
        if content is None or len(content) != payload["size"]:
            raise HubError(404, f"object {payload['oid']} was not uploaded")
        self._json(200, {"success": True})

    def create_branch(self, repo: str, branch: str):
        stored_repo = self._repo(repo, write=True)
        payload = json.loads(self._body() or b"{}")
        if branch in stored_repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit(stored_repo, payload.get("startingPoint") or "main")
        stored_repo.refs[branch] = start.oid
        self._json(200, {})

    def commit(self, repo: str, rev: str):
        stored_repo = self._repo(repo, write=True)
        if self.headers.get("Content-Type", "").split(";")[0] != "application/x-ndjson":
            raise HubError(400, "expected an application/x-ndjson body")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line must be the commit header")
        header = lines[0]["value"]
        if not header.get("summary"):
            raise HubError(400, "empty commit message")
        create_pr = self.query.get("create_pr", ["0"])[0] == "1"
        parent = self._commit(stored_repo, rev)
        if header.get("parentCommit") and header["parentCommit"] != parent.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(parent.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"invalid path {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"{path}: unsupported encoding {value.get('encoding')!r}")
                content = base64.b64decode(value["content"])
                files[path] = StoredFile(len(content), git_blob_sha1(content), False, content)
            elif key == "lfsFile":
                content = self.hub.blobs.get(value.get("oid", ""))
                if content is None or value.get("algo") != "sha256":
                    raise HubError(400, f"{path}: LFS object {value.get('oid')} was never uploaded")
                files[path] = StoredFile(len(content), value["oid"], True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"{path}: A file with this name doesn't exist", code="EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [name for name in files if name.startswith(prefix)]:
                    del files[name]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        new = self.hub._new_commit(stored_repo, parent, files, header["summary"])
        answer = {"success": True, "commitOid": new.oid, "commitUrl": f"{self.hub.endpoint}/{repo}/commit/{new.oid}"}
        if create_pr:
            number = 1 + sum(ref.startswith("refs/pr/") for ref in stored_repo.refs)
            stored_repo.refs[f"refs/pr/{number}"] = new.oid
            answer["pullRequestUrl"] = f"{self.hub.endpoint}/{repo}/discussions/{number}"
        else:
            stored_repo.refs[unquote(rev)] = new.oid
        self._json(200, answer)


def _lfs_pointer(stored: StoredFile) -> bytes:
    """The git-lfs pointer file that stands in the git tree for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{stored.oid}\nsize {stored.size}\n".encode()


if __name__ == "__main__":  # `python tests/hub_server.py` runs a server by hand (token "hf_local" for user "local")
    with HubServer({"hf_local": "local"}, port=8765) as hub:
        print(f"serving on {hub.endpoint}; token hf_local (user 'local'); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
