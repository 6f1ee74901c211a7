"""Helpers of the deploy tests: real processes on loopback (Redis, `hope serve`, nginx), the
repository's nginx config rendered for them, and small HTTP/SSE clients.

Nothing here talks to anything but 127.0.0.1. Every process is started here and stopped by its
own handle (never by name), every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.server.support import make_checkpoint  # noqa: F401  (tests/deploy takes it from here)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "hope.conf"
# a tiny random model: the tests are about the deployment, not the model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout} s")


# ---- processes -------------------------------------------------------------------------------------

class Process:
    """A child process with its output in a log file; stopped only through this handle."""

    name = "process"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


class RedisServer(Process):
    """redis-server on a loopback port with append-only persistence in a directory of its own,
    configured as deploy/compose.yaml configures it (appendonly yes, appendfsync everysec)."""

    name = "redis"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory / "redis.log")
        self.dir, self.port = directory, port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self._spawn([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                     "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                     "--maxmemory-policy", "noeviction", "--protected-mode", "yes", "--daemonize", "no"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"redis-server exited:\n{self.log_tail()}")
            try:
                client = self.client()
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server not up after {timeout} s:\n{self.log_tail()}")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5, socket_connect_timeout=1)

    def aof_files(self) -> list[Path]:
        return [p for p in self.dir.rglob("*") if p.is_file() and ".aof" in p.name]


class HopeServer(Process):
    """`hope serve` (the console entry point's module) on a fixed loopback port, so it can be
    restarted behind the same nginx upstream line."""

    name = "hope"

    def __init__(self, checkpoint: Path, store: str, log_path: Path, port: int | None = None,
                 **env: str) -> None:
        super().__init__(log_path)
        self.checkpoint, self.store, self.env = checkpoint, store, env
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"

    def spawn(self) -> HopeServer:
        # configuration only through the environment, as in the container image
        environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOPE_LOG_LEVEL": "warning",
                   "HOPE_HOST": "127.0.0.1", "HOPE_PORT": str(self.port), "HOPE_CHECKPOINT": str(self.checkpoint),
                   "HOPE_STORE": self.store, "HOPE_DEVICE": "cpu", **self.env}
        self._spawn([sys.executable, "-m", "hope.cli", "serve"], env=environ)
        return self

    def wait_ready(self, timeout: float = 90) -> HopeServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"hope serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"hope serve not ready after {timeout} s:\n{self.log_tail()}")

    def start(self) -> HopeServer:
        return self.spawn().wait_ready()


# ---- nginx -----------------------------------------------------------------------------------------

def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def render_nginx_conf(upstreams: dict[str, int], listen_port: int, access_log: Path,
                      source: Path = NGINX_CONF) -> str:
    """The repository's nginx config with its container addresses replaced by loopback ones.

    Only these lines change: each `server <host>:8000` of the upstream (compose service names)
    becomes `server 127.0.0.1:<port>`, `listen 8080` becomes a loopback port and the access log
    goes to a file. Each replacement must happen exactly once, so a changed config fails here
    instead of silently testing something else."""
    text = source.read_text()

    def sub(pattern: str, repl: str) -> None:
        nonlocal text
        text, n = re.subn(pattern, repl, text, flags=re.M)
        assert n == 1, f"nginx config: expected one match of {pattern!r}, found {n}"

    for host, port in upstreams.items():
        sub(rf"^(\s*server\s+){re.escape(host)}:8000\b", rf"\g<1>127.0.0.1:{port}")
    sub(r"^(\s*listen\s+)8080;", rf"\g<1>127.0.0.1:{listen_port};")
    sub(r"^(\s*access_log\s+)/dev/stdout(\s+hope;)", rf"\g<1>{access_log}\g<2>")
    return text


def nginx_main_conf(prefix: Path, site_conf: Path) -> Path:
    """What the nginx image's own nginx.conf provides around conf.d/*.conf, with every path in
    `prefix` (so nginx runs unprivileged and leaves the system alone)."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    main = prefix / "nginx.conf"
    # as root, nginx's workers would switch to `nobody`, who cannot enter pytest's private temp dir
    user = "user root root;" if os.geteuid() == 0 else ""
    main.write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    sendfile on;
    keepalive_timeout 65;
    include {site_conf};
}}
""")
    return main


class Nginx(Process):
    """nginx running the repository's config (rendered for loopback) in front of the replicas."""

    name = "nginx"

    def __init__(self, prefix: Path, upstreams: dict[str, int]) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        super().__init__(prefix / "nginx.out")
        self.prefix, self.port = prefix, free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.access_log = prefix / "access.log"
        site = prefix / "hope.conf"
        site.write_text(render_nginx_conf(upstreams, self.port, self.access_log))
        self.conf = nginx_main_conf(prefix, site)

    def test_config(self) -> subprocess.CompletedProcess:
        binary = nginx_binary()
        assert binary
        return subprocess.run([binary, "-t", "-p", str(self.prefix), "-c", str(self.conf)],
                              capture_output=True, text=True, timeout=30)

    def start(self, timeout: float = 20) -> Nginx:
        binary = nginx_binary()
        assert binary
        self._spawn([binary, "-p", str(self.prefix), "-c", str(self.conf)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"nginx exited:\n{self.log_tail()}\n{(self.prefix / 'error.log').read_text()}")
            try:
                httpx.get(f"{self.base_url}/healthz", timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def access_entries(self) -> list[dict[str, str]]:
        """The access log, one dict per request (fields of the config's `hope` log format)."""
        if not self.access_log.exists():
            return []
        out = []
        pattern = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d+) \d+ rt=\S+ upstream=(?P<upstream>.*?) '
                             r'ustatus=(?P<ustatus>.*?) session="(?P<session>[^"]*)" rid=(?P<rid>\S+)')
        for line in self.access_log.read_text().splitlines():
            m = pattern.search(line)
            if m:
                out.append(m.groupdict())
        return out


@dataclass
class Location:
    modifier: str  # "=", "~" or "" (a prefix)
    pattern: str
    directives: dict[str, str]  # name -> arguments, as written


def nginx_locations(text: str) -> list[Location]:
    """The `location` blocks of a server block, in the order written (enough of the syntax for
    deploy/nginx/hope.conf: no nested blocks, no braces inside a directive)."""
    out = []
    for m in re.finditer(r"^\s*location\s+(?:(=|~)\s+)?(\S+)\s*\{(.*?)\}", text, re.M | re.S):
        body = re.sub(r"#.*", "", m.group(3))
        directives = dict(d.strip().split(None, 1) if " " in d.strip() else (d.strip(), "")
                          for d in body.split(";") if d.strip())
        out.append(Location(m.group(1) or "", m.group(2), directives))
    return out


def nginx_location_for(locations: list[Location], path: str) -> Location:
    """The location nginx picks for a path: an exact match, else the first regex that matches,
    else the longest prefix."""
    for loc in locations:
        if loc.modifier == "=" and loc.pattern == path:
            return loc
    for loc in locations:
        if loc.modifier == "~" and re.search(loc.pattern, path):
            return loc
    prefixes = [loc for loc in locations if loc.modifier == "" and path.startswith(loc.pattern)]
    return max(prefixes, key=lambda loc: len(loc.pattern))


def nginx_seconds(value: str) -> float:
    """An nginx time ("15s", "10m", "600")."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value.strip())
    assert m, value
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


# ---- compose ---------------------------------------------------------------------------------------

class MissingVariable(Exception):
    """A `${NAME:?message}` (or `${NAME?message}`) that compose refuses to interpolate."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name, self.message = name, message


_COMPOSE_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def compose_interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable syntax on one value: `$$`, `$NAME`, `${NAME}`, `${NAME:-default}`,
    `${NAME-default}`, `${NAME:?error}`, `${NAME?error}` (an empty value counts as unset for the
    forms with a colon). Nested variables are not used in deploy/ and are refused here."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("plain"):
            return env.get(m.group("plain"), "")
        spec = m.group("braced")
        assert "$" not in spec, f"nested interpolation is not supported here: {spec}"
        name, op, arg = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?", spec, re.S).groups()
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op is None or not unset:
            return value or ""
        if op.endswith("?"):
            raise MissingVariable(name, arg)
        return arg

    return _COMPOSE_VARIABLE.sub(one, value)


def compose_config(path: Path, env: dict[str, str]) -> dict:
    """A compose file as `docker compose config` would resolve it with these variables: YAML
    anchors and merge keys first, then every string value interpolated (keys are not)."""
    import yaml

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return compose_interpolate(node, env) if isinstance(node, str) else node

    return resolve(yaml.safe_load(path.read_text()))


def published_host_ip(port: str | dict) -> str:
    """The host address a `ports` entry binds to; none given means every interface."""
    if isinstance(port, dict):
        return port.get("host_ip") or "0.0.0.0"
    parts = str(port).rsplit(":", 2)
    return parts[0].strip("[]") if len(parts) == 3 else "0.0.0.0"


# ---- a cluster: Redis, two replicas, nginx ---------------------------------------------------------

@dataclass
class Cluster:
    redis: RedisServer
    replicas: dict[str, HopeServer]  # compose service name -> process
    nginx: Nginx
    model: str
    prefix: str  # the Redis key prefix of the cluster's store
    extra: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nginx.base_url

    def replica_by_addr(self, addr: str) -> str:
        """The replica's service name for an upstream address in the access log."""
        port = int(addr.rsplit(":", 1)[1])
        return next(name for name, r in self.replicas.items() if r.port == port)

    def other(self, name: str) -> str:
        return next(n for n in self.replicas if n != name)

    def restart(self, name: str) -> HopeServer:
        old = self.replicas[name]
        old.stop()
        new = HopeServer(old.checkpoint, old.store, old.log_path, port=old.port, **old.env).start()
        self.replicas[name] = new
        return new

    def stop(self) -> None:
        for p in [self.nginx, *self.replicas.values(), *self.extra, self.redis]:
            try:
                p.stop()
            except Exception:  # keep stopping the others
                pass


# ---- HTTP helpers ----------------------------------------------------------------------------------

def chat_body(model: str, messages: list[dict] | str, **extra: Any) -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0, **extra}


@dataclass
class StreamResult:
    status: int
    headers: dict[str, str]
    events: list[Any]  # parsed `data:` payloads ("[DONE]" stays a string)
    error: Exception | None = None  # a transport error (connection cut mid-body)

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.events
                       if isinstance(c, dict) and c.get("choices"))

    @property
    def session(self) -> dict | None:
        for c in self.events:
            if isinstance(c, dict) and c.get("session"):
                return c["session"]
        return None

    @property
    def error_event(self) -> dict | None:
        for c in self.events:
            if isinstance(c, dict) and "error" in c:
                return c["error"]
        return None


def iter_sse(response: httpx.Response) -> Iterator[Any]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


def stream_chat(client: httpx.Client, url: str, body: dict, headers: dict[str, str] | None = None,
                on_event=None) -> StreamResult:
    """POST a streaming chat request and read it to its end (or until the connection breaks).
    `on_event(i, event)` is called for each event as it arrives."""
    events: list[Any] = []
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                           headers=headers) as r:
            if r.status_code != 200:
                r.read()
                return StreamResult(r.status_code, dict(r.headers), [r.json()] if r.content else [])
            for i, event in enumerate(iter_sse(r)):
                events.append(event)
                if on_event is not None:
                    on_event(i, event)
            return StreamResult(r.status_code, dict(r.headers), events)
    except httpx.TransportError as e:
        return StreamResult(200 if events else 0, {}, events, error=e)


def redis_session_keys(client: redis.Redis, prefix: str) -> dict[str, dict[str, bytes]]:
    """Every stored session under `prefix`, read straight from Redis: {session id: {part: bytes}}
    with parts meta (a JSON of the hash), state and hist."""
    out: dict[str, dict[str, bytes]] = {}
    for key in client.scan_iter(match=f"{prefix}:{{*}}:meta", count=1000):
        base = key.decode()[: -len(":meta")]
        sid = base.split("{", 1)[1].rstrip("}").split(":", 1)[1]
        meta = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        out[sid] = {"meta": json.dumps(meta, sort_keys=True).encode(),
                    "state": client.get(f"{base}:state") or b"", "hist": client.get(f"{base}:hist") or b""}
    return out


def state_version(blob: bytes) -> int:
    """The version written inside a state blob (safetensors metadata)."""
    n = int.from_bytes(blob[:8], "little")
    return int(json.loads(blob[8:8 + n])["__metadata__"]["version"])


def decode_state(blob: bytes) -> tuple[dict[str, str], dict]:
    """A state blob's metadata and tensors (safetensors; nothing is unpickled)."""
    from safetensors.torch import load

    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]).get("__metadata__", {}), load(blob)


def same_state(a: bytes, b: bytes) -> bool:
    """Two state blobs hold the same metadata and bit-identical tensors."""
    import torch

    (meta_a, ta), (meta_b, tb) = decode_state(a), decode_state(b)
    return meta_a == meta_b and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


# ---- Dockerfile --------------------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD arguments, if used."""
        text = self.args.split("CMD", 1)[1] if self.keyword == "HEALTHCHECK" else self.args
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        out = {}
        for i in self.all("ENV"):
            for m in re.finditer(r'(\w+)=("[^"]*"|\S+)', i.args):
                out[m.group(1)] = m.group(2).strip('"')
        return out


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARGs with their defaults, stages in order). Enough of the syntax for this repo's
    Dockerfile: comments, line continuations, instructions, `FROM x AS name`."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if current and raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            stages.append(Stage(m.group(1), m.group(2), []))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages
