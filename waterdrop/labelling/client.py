"""Label Studio's REST API from a script, and a local server for scripted rounds and tests.

    with local_server(".venv-labelstudio", "ls_data", document_root="pool/") as server:
        project = server.create_project("collage round 1", open("label_config.xml").read())
        server.add_local_storage(project, "pool/")
        server.import_tasks(project, json.load(open("tasks.json")))
        ...                                    # annotators label in the browser at server.url
        export = server.export(project)        # what tools/label_studio.py import reads

Standard library only (urllib), so it runs beside the runtime install.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LabelStudio:
    """A running Label Studio server, reached with an API token (Authorization: Token ...)."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url.rstrip("/"), token

    def call(self, method: str, path: str, body=None, raw: bool = False):
        """One API call; the parsed JSON answer (``raw``: its bytes)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Token {self.token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"Label Studio {method} {path}: HTTP {err.code}: {err.read()[:500]!r}") from err
        return payload if raw else json.loads(payload or b"null")

    def create_project(self, title: str, label_config: str) -> int:
        return self.call("POST", "/api/projects", {"title": title, "label_config": label_config})["id"]

    def add_local_storage(self, project: int, folder: str | Path) -> int:
        """Let the project show images under ``folder`` (inside the server's document root)."""
        return self.call("POST", "/api/storages/localfiles", {"project": project, "title": Path(folder).name,
                                                              "path": str(folder), "use_blob_urls": True})["id"]

    def import_tasks(self, project: int, tasks: list[dict]) -> int:
        return self.call("POST", f"/api/projects/{project}/import", tasks)["task_count"]

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project."""
        found, page = [], 1
        while True:
            answer = self.call("GET", f"/api/tasks?project={project}&page_size=500&page={page}")
            batch = answer["tasks"] if isinstance(answer, dict) else answer
            found += batch
            if len(batch) < 500:
                return found
            page += 1

    def annotate(self, task: int, result: list[dict], cancelled: bool = False) -> int:
        """Submit an annotation as an annotator would (``cancelled``: the annotator skipped the task)."""
        return self.call("POST", f"/api/tasks/{task}/annotations", {"result": result, "was_cancelled": cancelled})["id"]

    def export(self, project: int) -> list[dict]:
        """The project's tasks with their annotations, in Label Studio's JSON export format."""
        return self.call("GET", f"/api/projects/{project}/export?exportType=JSON&download_all_tasks=true")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def local_server(venv: str | Path, data: str | Path, document_root: str | Path, token: str = "waterdrop-local-token",
                 timeout: float = 300) -> Iterator[LabelStudio]:
    """Start ``label-studio`` from its own virtual environment on a free local port, with one
    user whose API token is ``token``, serving files under ``document_root``; stop it on exit.

    Raises:
        RuntimeError: it is not installed there, it stopped, or it did not answer in ``timeout`` s.
    """
    program = Path(venv) / "bin" / "label-studio"
    if not program.exists():
        raise RuntimeError(f"{program} is missing; install it with: make label-studio")
    data = Path(data)
    data.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    # Its own environment: nothing of ours (PYTHONPATH, our venv) reaches its interpreter.
    env = {"PATH": f"{program.parent}:/usr/bin:/bin", "HOME": str(data), "LANG": "C.UTF-8",
           "LABEL_STUDIO_BASE_DATA_DIR": str(data), "LABEL_STUDIO_USERNAME": "annotator@example.com",
           "LABEL_STUDIO_PASSWORD": "waterdrop-local-password", "LABEL_STUDIO_USER_TOKEN": token,
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
           "LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": os.path.abspath(document_root)}
    log_path = data / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(program), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"Label Studio stopped: {log_path.read_text()[-2000:]}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Label Studio did not answer in {timeout:.0f} s: "
                                       f"{log_path.read_text()[-2000:]}")
                time.sleep(1)
            yield LabelStudio(url, token)
        finally:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
