"""Load profile for YMERA's HTTP API (the contract is shared/api.md).

Two kinds of simulated users, readers weighted 4:1 over writers:

* ``Reader``: lists (with filters and a second page), single reads (some
  conditional, with ``If-None-Match``), search, history, projects, the JSON
  metrics, analytics, health and system info; rarely an export, a short look
  at the live feed (SSE and WebSocket).
* ``Writer``: creates (some with ``Idempotency-Key`` and a replay), updates,
  whole lifecycles with ``If-Match`` (including a deliberately stale one that
  must answer 412) and deletes, projects, rarely a bulk create and (admins
  only) user management. Every read after a write sends
  ``X-Min-Event-Seq: <X-Event-Seq of the write>`` and checks that it sees the
  write (read-your-writes).

Every response is checked against api.md (status, headers, body) and a
mismatch is a Locust failure with the method, route, status, request id,
trace id and the start of the body. Requests are named by route, so stats
group.

Accounts: each simulated user works under an account of its own (readers
viewers, writers editors), which it creates on start with the load admin's
token and deletes when it stops: the API's rate limit is per user, so a run
measures many clients, not one client's allowance. With
YMERA_LOAD_ACCOUNTS=shared (or a load user that is not an admin), every
simulated user logs in as the load user instead, as before.

Traces: every request carries a fresh, sampled W3C ``traceparent``. The
trace ids of failed requests are in their failure messages, and when the
run ends the slowest requests and the failed ones are written with their
trace ids to ``$YMERA_LOAD_OUT/ymera_traces.csv`` and the slowest printed,
so a bad request in the report leads to its trace in Jaeger.

Tags select tasks (``--tags``/``--exclude-tags``): ``read``, ``write``,
``search``, ``history``, ``as_of``, ``export``, ``live``, ``ops``,
``prometheus`` (the root ``/metrics``, which the compose stack's nginx does
not expose), ``spec``, ``users``.

Environment:
  YMERA_LOAD_USER      (default "admin")
  YMERA_LOAD_PASSWORD  (default $YMERA_ADMIN_PASSWORD); an admin makes the
                       account pool; otherwise the user needs the editor or
                       admin role for the writers' tasks.
  YMERA_LOAD_ACCOUNTS  ``pool`` (default) or ``shared``
  YMERA_LOAD_OUT       where ymera_traces.csv goes (default: the working
                       directory)

Agents that other users may read are tagged ``pool=shared`` and never
deleted; agents a writer deletes are tagged ``pool=scratch`` and never read by
anyone else, so a 404 is always a real failure.
"""

from __future__ import annotations

import collections
import csv
import datetime
import heapq
import io
import itertools
import json
import os
import random
import threading
import time
import uuid

from locust import HttpUser, between, events, tag, task
from locust.exception import StopUser
from locust.runners import WorkerRunner

API = "/api/v1"
LOGIN_USER = os.environ.get("YMERA_LOAD_USER", "admin")
LOGIN_PASSWORD = os.environ.get("YMERA_LOAD_PASSWORD") or os.environ.get(
    "YMERA_ADMIN_PASSWORD", ""
)
LOGIN_PATIENCE = float(os.environ.get("YMERA_LOAD_LOGIN_PATIENCE", "180"))
ACCOUNTS = os.environ.get("YMERA_LOAD_ACCOUNTS", "pool")
REPORT_DIR = os.environ.get("YMERA_LOAD_OUT", ".")
# How many of the slowest requests, and of the failed ones, the trace report
# keeps (per Locust process, then merged).
SLOWEST_KEPT = 50
FAILED_KEPT = 200
# One id per Locust process: tags this run's agents, names its users.
RUN_ID = uuid.uuid4().hex[:8]

TYPES = ["llm", "retriever", "planner", "tool-runner", "summarizer", "router"]
STATUSES = ["active", "inactive", "paused", "error"]
CAPABILITIES = [
    "search", "summarize", "translate", "classify", "plan", "code",
    "browse", "extract", "rank", "chat",
]
NAMES = ["Scout", "Summarizer", "Planner", "Retriever", "Router", "Critic",
         "Navigator", "Archivist", "Translator", "Analyst"]
# Prefixes, whole words and small typos, as a person would type them.
SEARCH_TERMS = ["scout", "summ", "plannr", "retriev", "router", "critc",
                "navigator", "search", "translate", "analyst", "llm", "arch"]


class Pool:
    """Ids shared between the users of this Locust process (bounded)."""

    def __init__(self, size: int) -> None:
        self._items: collections.deque[str] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, item: str) -> None:
        with self._lock:
            self._items.append(item)

    def pick(self) -> str | None:
        with self._lock:
            return random.choice(self._items) if self._items else None

    def __len__(self) -> int:
        return len(self._items)


# The first reader and the first writer of a run visit their rare endpoints
# once on start, so even a short run covers every endpoint.
_toured: set[str] = set()
_toured_lock = threading.Lock()


def first_of(kind: str) -> bool:
    with _toured_lock:
        if kind in _toured:
            return False
        _toured.add(kind)
        return True


SHARED_AGENTS = Pool(5000)
SHARED_PROJECTS = Pool(200)
_last_seq = 0
_last_seq_lock = threading.Lock()


def note_seq(seq: int) -> None:
    global _last_seq
    with _last_seq_lock:
        _last_seq = max(_last_seq, seq)


def last_seq() -> int:
    return _last_seq


def new_traceparent() -> str:
    """A fresh W3C traceparent: a new trace, sampled."""
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"


def trace_id_of(request) -> str:
    tp = (request.headers.get("traceparent", "") if request is not None else "")
    parts = tp.split("-")
    return parts[1] if len(parts) == 4 else "-"


class Traces:
    """The slowest requests and the failed ones, with their trace ids
    (bounded: a heap of the slowest, the first failures)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tie = itertools.count()
        self.slowest: list[tuple] = []  # min-heap of (ms, tie, row)
        self.failed: list[dict] = []

    def record(self, row: dict, failed: bool) -> None:
        with self._lock:
            item = (row["response_time_ms"], next(self._tie), row)
            if len(self.slowest) < SLOWEST_KEPT:
                heapq.heappush(self.slowest, item)
            elif item[0] > self.slowest[0][0]:
                heapq.heapreplace(self.slowest, item)
            if failed and len(self.failed) < FAILED_KEPT:
                self.failed.append(row)

    def take(self) -> dict:
        """What a worker sends its master, and forgets."""
        with self._lock:
            out = {"slowest": [r for _, _, r in self.slowest], "failed": self.failed}
            self.slowest, self.failed = [], []
            return out

    def merge(self, data: dict) -> None:
        for row in data.get("slowest", []):
            self.record(row, False)
        with self._lock:
            room = FAILED_KEPT - len(self.failed)
            self.failed.extend(data.get("failed", [])[:max(room, 0)])

    def rows(self) -> list[dict]:
        with self._lock:
            slow = [dict(r, kind="slowest") for _, _, r in sorted(self.slowest, reverse=True)]
            return slow + [dict(r, kind="failed") for r in self.failed]


TRACES = Traces()


@events.request.add_listener
def _trace(request_type, name, response_time, response_length, response=None,
           exception=None, context=None, **_kw) -> None:
    request = getattr(response, "request", None)
    trace = (context or {}).get("trace_id") or trace_id_of(request)
    TRACES.record({
        "name": f"{request_type} {name}" if not name.startswith(request_type) else name,
        "response_time_ms": round(response_time or 0, 1),
        "status": getattr(response, "status_code", "") or "",
        "request_id": (response.headers.get("X-Request-Id", "-")
                       if getattr(response, "headers", None) is not None else "-"),
        "trace_id": trace,
        "error": str(exception)[:300] if exception else "",
    }, exception is not None)


@events.report_to_master.add_listener
def _send_traces(client_id, data, **_kw) -> None:
    data["ymera_traces"] = TRACES.take()


@events.worker_report.add_listener
def _merge_traces(client_id, data, **_kw) -> None:
    TRACES.merge(data.get("ymera_traces", {}))


class AdminSession:
    """The load user's own token, shared by the simulated users of this
    process to create and delete their accounts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.token = ""
        self.role = ""
        self.expires_at = 0.0

    def get(self, user: "YmeraUser") -> tuple[str, str]:
        with self._lock:
            if time.time() > self.expires_at - 60:
                body = user.login_as(LOGIN_USER, LOGIN_PASSWORD,
                                     "POST /api/v1/auth/login [load admin]")
                self.token = body["access_token"]
                self.role = body.get("role", "")
                self.expires_at = time.time() + float(body.get("expires_in", 3600))
            return self.token, self.role


ADMIN = AdminSession()
_account_numbers = itertools.count(1)
# Creating an account hashes its password (Argon2id, deliberately costly):
# one at a time per Locust process, so that a ramp-up does not pile dozens
# of hashes onto the server at once on top of the users' logins.
_account_lock = threading.Lock()


class Bad(Exception):
    """A response that breaks the contract; the message says how."""


def parse_time(s: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00"))


def etag(version: int) -> str:
    return f'"{version}"'


def agent_body(pool: str, owner: str, project_id: str | None = None) -> dict:
    name = f"{random.choice(NAMES)} {random.randint(1, 99999)}"
    body = {
        "name": name,
        "type": random.choice(TYPES),
        "description": f"{name} handles {random.choice(CAPABILITIES)} for load run {RUN_ID}",
        "status": random.choice(STATUSES),
        "capabilities": random.sample(CAPABILITIES, random.randint(1, 4)),
        "config": {"model": random.choice(["small", "medium", "large"]),
                   "temperature": round(random.random(), 2)},
        "tags": {"pool": pool, "run": RUN_ID, "owner": owner},
    }
    if project_id:
        body["project_id"] = project_id
    return body


class YmeraUser(HttpUser):
    abstract = True

    token: str = ""
    token_expires_at: float = 0.0
    role: str = ""

    # ---------------------------------------------------------------- plumbing

    # The role a pool account of this kind of user gets.
    account_role = "viewer"

    def on_start(self) -> None:
        self.owner = f"{RUN_ID}-{uuid.uuid4().hex[:6]}"
        self.etags: dict[str, str] = {}
        self.account: str | None = None
        self.trace_every_request()
        if not LOGIN_PASSWORD:
            raise StopUser("set YMERA_LOAD_PASSWORD or YMERA_ADMIN_PASSWORD")
        self.username, self.password = LOGIN_USER, LOGIN_PASSWORD
        if ACCOUNTS == "pool":
            self.make_account()
        self.login()

    def on_stop(self) -> None:
        if self.account:
            admin, _ = ADMIN.get(self)
            self.call("DELETE", f"{API}/users/{self.account}",
                      "DELETE /api/v1/users/{username} [load account]", (204, 404),
                      headers={"Authorization": f"Bearer {admin}"}, auth=False)

    def trace_every_request(self) -> None:
        """Every request of this user's session carries a fresh traceparent."""
        send = self.client.request

        def traced(method, url, **kw):
            headers = dict(kw.pop("headers", None) or {})
            headers.setdefault("traceparent", new_traceparent())
            return send(method, url, headers=headers, **kw)

        self.client.request = traced

    def make_account(self) -> None:
        """An account of this user's own, made with the load admin's token;
        without an admin, everyone shares the load user's account."""
        admin, role = ADMIN.get(self)
        if role != "admin":
            return
        # Processes of one run (--processes) share RUN_ID: the pid tells
        # their accounts apart.
        name = f"load-{RUN_ID}-{os.getpid()}-{next(_account_numbers)}"
        password = uuid.uuid4().hex
        with _account_lock:
            created = self.call("POST", f"{API}/users", "POST /api/v1/users [load account]",
                                (201,), headers={"Authorization": f"Bearer {admin}"},
                                auth=False, json={"username": name, "password": password,
                                                  "role": self.account_role})
        if created:
            self.account = name
            self.username, self.password = name, password
        else:
            raise StopUser()

    def login(self) -> None:
        body = self.login_as(self.username, self.password, "POST /api/v1/auth/login")
        self.token = body["access_token"]
        self.role = body.get("role", "")
        self.token_expires_at = time.time() + float(body.get("expires_in", 3600))

    def login_as(self, username: str, password: str, name: str) -> dict:
        """Logs in; returns the login body. A 429 (login attempts are limited
        per username and per address, 60 a minute by default) is waited out
        as its Retry-After says, with some jitter, for up to
        YMERA_LOAD_LOGIN_PATIENCE seconds (180); those 429s are counted under
        their own name, not as failures."""
        deadline = time.time() + LOGIN_PATIENCE
        while True:
            with self.client.post(
                f"{API}/auth/login",
                json={"username": username, "password": password},
                name=name,
                catch_response=True,
            ) as r:
                if r.status_code == 429:
                    r.request_meta["name"] = f"{name} [429, waited out]"
                    wait = self.problem_retry_after(r)
                    if wait is None:
                        raise StopUser()
                    if time.time() + wait > deadline:
                        r.failure(self.describe(
                            r, f"login still rate limited after {LOGIN_PATIENCE:.0f} s"))
                        raise StopUser()
                    # Limited as the contract says: not a failure; wait it out.
                    r.success()
                    time.sleep(wait + random.uniform(0, 3))
                    continue
                try:
                    self.expect(r, 200)
                    body = r.json()
                    if body.get("token_type") != "bearer" or not body.get("access_token"):
                        raise Bad(self.describe(r, "login body without a bearer token"))
                except (Bad, ValueError) as e:
                    r.failure(str(e))
                    raise StopUser() from None
                r.success()
                return body

    def problem_retry_after(self, r) -> float | None:
        """The Retry-After of a well-formed 429 problem, else marks a failure."""
        ra = r.headers.get("Retry-After")
        if not ra or not ra.isdigit() or not self.is_problem(r):
            r.failure(self.describe(r, "429 without Retry-After or not problem+json"))
            return None
        return float(ra)

    def auth(self, extra: dict | None = None) -> dict:
        if time.time() > self.token_expires_at - 60:
            self.login()
        h = {"Authorization": f"Bearer {self.token}"}
        if extra:
            h.update(extra)
        return h

    @staticmethod
    def is_problem(r) -> bool:
        if not r.headers.get("Content-Type", "").startswith("application/problem+json"):
            return False
        try:
            body = r.json()
        except ValueError:
            return False
        return isinstance(body, dict) and body.get("status") == r.status_code

    @staticmethod
    def describe(r, why: str) -> str:
        method = r.request.method if r.request is not None else "?"
        url = r.request.url if r.request is not None else r.url
        text = (r.text or "")[:300].replace("\n", " ")
        return (f"{why} | {method} {url} -> {r.status_code} "
                f"request_id={r.headers.get('X-Request-Id', '-')} "
                f"trace_id={trace_id_of(r.request)} body={text!r}")

    def expect(self, r, *statuses: int) -> None:
        """Status is one of `statuses`; every response has X-Request-Id;
        errors are problem+json; success bodies are JSON where they have one."""
        if r.status_code not in statuses:
            raise Bad(self.describe(r, f"expected {'/'.join(map(str, statuses))}"))
        if not r.headers.get("X-Request-Id"):
            raise Bad(self.describe(r, "no X-Request-Id"))
        if r.status_code >= 400 and not self.is_problem(r):
            raise Bad(self.describe(r, "error is not application/problem+json"))

    def read_seq(self, r) -> int:
        v = r.headers.get("X-Projection-Seq", "")
        if not v.isdigit():
            raise Bad(self.describe(r, "read without a numeric X-Projection-Seq"))
        return int(v)

    def write_seq(self, r) -> int:
        v = r.headers.get("X-Event-Seq", "")
        if not v.isdigit():
            raise Bad(self.describe(r, "write without a numeric X-Event-Seq"))
        seq = int(v)
        note_seq(seq)
        return seq

    def call(self, method: str, path: str, name: str, expect: tuple[int, ...],
             check=None, headers: dict | None = None, auth: bool = True, **kw):
        """One request, checked: `expect` statuses, then `check(r)` (which
        raises Bad). Returns `check`'s result, or None on failure."""
        h = self.auth(headers) if auth else dict(headers or {})
        with self.client.request(method, path, name=name, headers=h,
                                 catch_response=True, **kw) as r:
            try:
                self.expect(r, *expect)
                out = check(r) if check else r
                r.success()
                return out if out is not None else True
            except Bad as e:
                r.failure(str(e))
            except (ValueError, KeyError, TypeError) as e:  # bad JSON or shape
                r.failure(self.describe(r, f"unexpected body ({type(e).__name__}: {e})"))
        return None

    # ------------------------------------------------------------ reads (shared)

    def check_agent(self, r, agent_id: str | None = None, min_version: int = 1) -> dict:
        self.read_seq(r) if r.request.method == "GET" else None
        a = r.json()
        for f in ("id", "name", "type", "description", "status", "capabilities", "config",
                  "tags", "project_id", "version", "created_at", "updated_at", "created_by"):
            if f not in a:
                raise Bad(self.describe(r, f"agent without {f!r}"))
        if agent_id and a["id"] != agent_id:
            raise Bad(self.describe(r, f"asked for agent {agent_id}, got {a['id']}"))
        if a["version"] < min_version:
            raise Bad(self.describe(
                r, f"read-your-writes: version {a['version']} < written {min_version}"))
        if r.headers.get("ETag") != etag(a["version"]):
            raise Bad(self.describe(r, f"ETag {r.headers.get('ETag')} != version {a['version']}"))
        return a

    def check_page(self, r, item_check=None) -> dict:
        self.read_seq(r)
        page = r.json()
        if not isinstance(page.get("items"), list) or "next_cursor" not in page:
            raise Bad(self.describe(r, "not a page {items, next_cursor}"))
        if item_check:
            for item in page["items"]:
                item_check(item)
        return page

    def get_agent(self, agent_id: str, min_seq: int | None = None, min_version: int = 1):
        headers = {"X-Min-Event-Seq": str(min_seq)} if min_seq else None
        return self.call("GET", f"{API}/agents/{agent_id}", "GET /api/v1/agents/{id}",
                         (200,), lambda r: self.check_agent(r, agent_id, min_version),
                         headers=headers)

    def expect_gone(self, path: str, name: str, min_seq: int) -> None:
        self.call("GET", path, name, (404,), headers={"X-Min-Event-Seq": str(min_seq)})

    def check_project(self, r, project_id: str | None = None, min_version: int = 1) -> dict:
        if r.request.method == "GET":
            self.read_seq(r)
        p = r.json()
        # Only a read counts agents; a write answers from the log alone.
        fields = ("id", "name", "description", "version", "created_at", "updated_at",
                  "created_by") + (("agent_count",) if r.request.method == "GET" else ())
        for f in fields:
            if f not in p:
                raise Bad(self.describe(r, f"project without {f!r}"))
        if project_id and p["id"] != project_id:
            raise Bad(self.describe(r, f"asked for project {project_id}, got {p['id']}"))
        if p["version"] < min_version:
            raise Bad(self.describe(
                r, f"read-your-writes: version {p['version']} < written {min_version}"))
        if r.headers.get("ETag") != etag(p["version"]):
            raise Bad(self.describe(r, f"ETag {r.headers.get('ETag')} != version {p['version']}"))
        return p


class Reader(YmeraUser):
    """Reads only: ~4 of every 5 users."""

    weight = 4
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        super().on_start()
        if len(SHARED_AGENTS) == 0:
            # Agents of earlier runs that nobody deletes.
            page = self.call("GET", f"{API}/agents?tag=pool:shared&limit=200",
                             "GET /api/v1/agents", (200,), self.check_page)
            if page:
                for a in page["items"]:
                    SHARED_AGENTS.add(a["id"])
        if first_of("reader"):
            for visit in (self.health, self.system_info, self.probes, self.metrics,
                          self.analytics, self.export, self.live_sse, self.live_ws,
                          self.get_agent_as_of, self.prometheus, self.spec):
                visit()

    @tag("read")
    @task(10)
    def list_agents(self) -> None:
        params = {"limit": random.choice([10, 20, 50, 100])}
        filt = random.choice(["", "status", "type", "tag", "project"])
        if filt == "status":
            params["status"] = random.choice(STATUSES)
        elif filt == "type":
            params["type"] = random.choice(TYPES)
        elif filt == "tag":
            params["tag"] = "pool:shared"
        elif filt == "project" and (pid := SHARED_PROJECTS.pick()):
            params["project_id"] = pid
        headers = None
        if random.random() < 0.2 and last_seq():
            # Follow the writers: answer only once their latest write is visible.
            headers = {"X-Min-Event-Seq": str(last_seq())}

        def check(r):
            page = self.check_page(r)
            if len(page["items"]) > params["limit"]:
                raise Bad(self.describe(r, "more items than limit"))
            for item in page["items"]:
                for k in ("status", "type"):
                    if k in params and item[k] != params[k]:
                        raise Bad(self.describe(r, f"filter {k}={params[k]} returned {item[k]}"))
            # Newest first: keyset order (created_at, id) descending. Compare
            # times, not strings: the fraction of a second varies in length.
            keys = [(parse_time(i["created_at"]), i["id"]) for i in page["items"]]
            if keys != sorted(keys, reverse=True):
                raise Bad(self.describe(r, "list is not newest first"))
            return page

        page = self.call("GET", f"{API}/agents", "GET /api/v1/agents", (200,), check,
                         headers=headers, params=params)
        if page and page["next_cursor"] and random.random() < 0.3:
            self.call("GET", f"{API}/agents", "GET /api/v1/agents", (200,), check,
                      params={**params, "cursor": page["next_cursor"]})

    @tag("read")
    @task(10)
    def get_agent_task(self) -> None:
        agent_id = SHARED_AGENTS.pick()
        if agent_id is None:
            return self.list_agents()
        self.get_agent(agent_id)

    @tag("read")
    @task(3)
    def get_agent_conditional(self) -> None:
        agent_id = SHARED_AGENTS.pick()
        if agent_id is None:
            return self.list_agents()
        tag = self.etags.get(agent_id)
        headers = {"If-None-Match": tag} if tag else None

        def check(r):
            self.read_seq(r)
            if r.status_code == 304:
                if r.content:
                    raise Bad(self.describe(r, "304 with a body"))
                return True
            a = self.check_agent(r, agent_id)
            self.etags[agent_id] = r.headers["ETag"]
            return a

        # 200 when it changed since (or first time), 304 when not.
        self.call("GET", f"{API}/agents/{agent_id}", "GET /api/v1/agents/{id}",
                  (200, 304), check, headers=headers)

    @tag("search")
    @task(5)
    def search(self) -> None:
        params = {"q": random.choice(SEARCH_TERMS), "limit": random.choice([10, 20, 50])}
        if random.random() < 0.3:
            params["status"] = random.choice(STATUSES)

        def check(r):
            page = self.check_page(r)
            scores = [i.get("score") for i in page["items"]]
            if any(not isinstance(s, (int, float)) for s in scores):
                raise Bad(self.describe(r, "search item without a numeric score"))
            if scores != sorted(scores, reverse=True):
                raise Bad(self.describe(r, "search results not best first"))
            return page

        self.call("GET", f"{API}/agents/search", "GET /api/v1/agents/search", (200,), check,
                  params=params)

    @tag("history")
    @task(2)
    def history(self) -> None:
        agent_id = SHARED_AGENTS.pick()
        if agent_id is None:
            return

        def check(r):
            page = self.check_page(r)
            items = page["items"]
            if not items or items[0].get("type") != "agent.created":
                raise Bad(self.describe(r, "history does not start with agent.created"))
            seqs = [i["seq"] for i in items]
            if seqs != sorted(seqs):
                raise Bad(self.describe(r, "history not oldest first"))
            return page

        self.call("GET", f"{API}/agents/{agent_id}/history",
                  "GET /api/v1/agents/{id}/history", (200,), check)

    @tag("read")
    @task(3)
    def list_projects(self) -> None:
        self.call("GET", f"{API}/projects", "GET /api/v1/projects", (200,),
                  lambda r: self.check_page(r, self.check_listed_project),
                  params={"limit": random.choice([10, 50])})

    def check_listed_project(self, p: dict) -> None:
        if not isinstance(p.get("agent_count"), int) or p["agent_count"] < 0:
            raise Bad(f"listed project without a count: {p!r}")

    @tag("read")
    @task(3)
    def get_project(self) -> None:
        pid = SHARED_PROJECTS.pick()
        if pid is None:
            return self.list_projects()
        self.call("GET", f"{API}/projects/{pid}", "GET /api/v1/projects/{id}", (200,),
                  lambda r: self.check_project(r, pid))

    @tag("ops")
    @task(1)
    def metrics(self) -> None:
        def check(r):
            m = r.json()
            for k in ("uptime_seconds", "http", "events", "projector", "db_pool", "live"):
                if k not in m:
                    raise Bad(self.describe(r, f"metrics without {k!r}"))
            if not {"p50", "p90", "p99"} <= set(m["http"]["latency_ms"]):
                raise Bad(self.describe(r, "metrics without latency percentiles"))
            return m

        self.call("GET", f"{API}/metrics", "GET /api/v1/metrics", (200,), check)

    @tag("read")
    @task(1)
    def analytics(self) -> None:
        params = {"bucket": random.choice(["minute", "hour", "day"])}
        if params["bucket"] == "minute":
            # The last hour: 60 buckets.
            now = time.time()
            params["from"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600))
            params["to"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        if random.random() < 0.3 and (pid := SHARED_PROJECTS.pick()):
            params["project_id"] = pid
        name = "GET /api/v1/analytics"
        if random.random() < 0.2:
            # The totals as they stood a minute ago, from the event log.
            params["as_of"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
            name = "GET /api/v1/analytics?as_of"

        def check(r):
            self.read_seq(r)
            a = r.json()
            for k in ("totals", "events_over_time", "top_capabilities", "as_of_seq"):
                if k not in a:
                    raise Bad(self.describe(r, f"analytics without {k!r}"))
            if not {"agents", "by_status", "by_type"} <= set(a["totals"]):
                raise Bad(self.describe(r, "analytics totals incomplete"))
            return a

        self.call("GET", f"{API}/analytics", name, (200,), check, params=params)

    @tag("ops")
    @task(1)
    def health(self) -> None:
        def check(r):
            h = r.json()
            if h.get("status") not in ("ok", "degraded"):
                raise Bad(self.describe(r, f"health status {h.get('status')!r}"))
            if not {"nats", "postgres", "projector"} <= set(h.get("checks", {})):
                raise Bad(self.describe(r, "health without its checks"))
            return h

        self.call("GET", f"{API}/health", "GET /api/v1/health", (200,), check, auth=False)

    @tag("ops")
    @task(1)
    def system_info(self) -> None:
        def check(r):
            info = r.json()
            for k in ("name", "version", "git_sha", "role", "started_at", "uptime_seconds",
                      "stream", "nats_server_version", "postgres_version"):
                if k not in info:
                    raise Bad(self.describe(r, f"system info without {k!r}"))
            if info["role"] not in ("all", "command", "query", "projector"):
                raise Bad(self.describe(r, f"unknown role {info['role']!r}"))
            return info

        self.call("GET", f"{API}/system/info", "GET /api/v1/system/info", (200,), check,
                  auth=False)

    @tag("ops")
    @task(1)
    def probes(self) -> None:
        self.call("GET", "/livez", "GET /livez", (200,), auth=False)
        self.call("GET", "/readyz", "GET /readyz", (200,), auth=False)

    @tag("as_of")
    @task(2)
    def get_agent_as_of(self) -> None:
        """An agent as it was a moment ago, rebuilt from its events."""
        agent_id = SHARED_AGENTS.pick()
        if agent_id is None:
            return self.list_agents()
        then = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        def check(r):
            a = r.json()
            if a.get("id") != agent_id or not isinstance(a.get("version"), int):
                raise Bad(self.describe(r, "as_of read without the agent's id and version"))
            return a

        self.call("GET", f"{API}/agents/{agent_id}", "GET /api/v1/agents/{id}?as_of", (200,),
                  check, params={"as_of": then})

    @tag("prometheus")
    @task(1)
    def prometheus(self) -> None:
        """The root Prometheus scrape (no token)."""
        def check(r):
            if not r.headers.get("Content-Type", "").startswith("text/plain"):
                raise Bad(self.describe(r, "scrape is not text/plain"))
            if "ymera_http_requests_total" not in r.text:
                raise Bad(self.describe(r, "scrape without ymera_http_requests_total"))
            return True

        self.call("GET", "/metrics", "GET /metrics", (200,), check, auth=False)

    @tag("spec")
    @task(1)
    def spec(self) -> None:
        def check(r):
            spec = r.json()
            if not str(spec.get("openapi", "")).startswith("3.") or "/api/v1/agents" not in spec.get("paths", {}):
                raise Bad(self.describe(r, "not an OpenAPI 3 spec of the agents API"))
            return True

        self.call("GET", f"{API}/openapi.json", "GET /api/v1/openapi.json", (200,), check,
                  auth=False)

    @tag("export")
    @task(1)
    def export(self) -> None:
        fmt = random.choice(["csv", "ndjson", "json"])
        # A slice of the agents, so the download stays modest on a big table.
        params = {"format": fmt, "type": random.choice(TYPES), "status": "paused"}

        def check(r):
            self.read_seq(r)
            cd = r.headers.get("Content-Disposition", "")
            if not cd.startswith("attachment"):
                raise Bad(self.describe(r, f"export without Content-Disposition: attachment ({cd!r})"))
            text = r.text
            if fmt == "csv":
                rows = list(csv.reader(io.StringIO(text)))
                if not rows or "id" not in rows[0]:
                    raise Bad(self.describe(r, "CSV without a header row"))
                bad = [row for row in rows[1:] if row and row[rows[0].index("status")] != "paused"]
            elif fmt == "ndjson":
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
                bad = [i for i in items if i["status"] != "paused"]
            else:
                items = json.loads(text)
                if not isinstance(items, list):
                    raise Bad(self.describe(r, "JSON export is not an array"))
                bad = [i for i in items if i["status"] != "paused"]
            if bad:
                raise Bad(self.describe(r, f"export filter status=paused let through {bad[:1]!r}"))
            return True

        self.call("GET", f"{API}/agents/export", "GET /api/v1/agents/export", (200,), check,
                  params=params)

    @tag("live")
    @task(1)
    def live_sse(self) -> None:
        """Opens the SSE feed replaying the last few events, reads the first
        one (or waits up to 3 s on a quiet system), then hangs up."""
        since = max(0, last_seq() - 5)
        with self.client.get(f"{API}/events/stream", name="GET /api/v1/events/stream",
                             params={"since_seq": since}, headers=self.auth(),
                             stream=True, catch_response=True, timeout=(5, 3)) as r:
            try:
                self.expect(r, 200)
                if not r.headers.get("Content-Type", "").startswith("text/event-stream"):
                    raise Bad(self.describe(r, "SSE without text/event-stream"))
                deadline = time.time() + 3
                try:
                    for line in r.iter_lines(decode_unicode=True):
                        if line and line.startswith("data:"):
                            env = json.loads(line[5:])
                            if "seq" not in env or "type" not in env:
                                raise Bad(self.describe(r, f"SSE event without seq/type: {line[:200]}"))
                            break
                        if time.time() > deadline:
                            break
                except Exception as e:  # read timeout on a quiet feed
                    if isinstance(e, Bad):
                        raise
                r.success()
            except Bad as e:
                r.failure(str(e))
            finally:
                r.close()

    @tag("live")
    @task(1)
    def live_ws(self) -> None:
        """Opens the WebSocket feed replaying the last few events, reads one
        frame (or waits up to 3 s), then closes."""
        import websocket  # websocket-client, installed with Locust

        since = max(0, last_seq() - 5)
        url = self.host.replace("http", "ws", 1).rstrip("/") + f"{API}/ws?since_seq={since}"
        traceparent = new_traceparent()
        start = time.perf_counter()
        exc = None
        size = 0
        try:
            ws = websocket.create_connection(
                url, timeout=5, header=[f"Authorization: Bearer {self.auth()['Authorization'][7:]}",
                                        f"traceparent: {traceparent}"])
            try:
                ws.settimeout(3)
                try:
                    frame = ws.recv()
                    size = len(frame)
                    env = json.loads(frame)
                    if "seq" not in env or "type" not in env:
                        exc = Bad(f"WebSocket frame without seq/type: {frame[:200]!r}")
                except websocket.WebSocketTimeoutException:
                    pass  # quiet feed: connected is enough
            finally:
                ws.close()
        except websocket.WebSocketBadStatusException as e:
            exc = Bad(f"WebSocket upgrade refused: {e.status_code} {e.resp_body!r}"[:400])
        except Exception as e:  # connection errors
            exc = e
        self.environment.events.request.fire(
            request_type="WS", name="GET /api/v1/ws", response_time=(time.perf_counter() - start) * 1000,
            response_length=size, exception=exc, context={"trace_id": traceparent.split("-")[1]})


class Writer(YmeraUser):
    """Writes, each followed by a read-your-writes check: ~1 in 5 users."""

    weight = 1
    account_role = "editor"
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        super().on_start()
        if self.role not in ("editor", "admin"):
            raise StopUser(f"{LOGIN_USER} is a {self.role}: writers need editor or admin")
        if len(SHARED_PROJECTS) < 3:
            self.create_project()
        if first_of("writer"):
            self.bulk()
            self.users()

    # ---------------------------------------------------------------- agents

    def check_created_agent(self, r, body: dict) -> tuple[dict, int]:
        a = self.check_agent(r)
        seq = self.write_seq(r)
        if a["version"] != 1:
            raise Bad(self.describe(r, f"new agent with version {a['version']}"))
        if not r.headers.get("Location", "").endswith(f"/agents/{a['id']}"):
            raise Bad(self.describe(r, f"Location {r.headers.get('Location')!r}"))
        if a["name"] != body["name"] or a["tags"] != body["tags"]:
            raise Bad(self.describe(r, "created agent differs from the request"))
        return a, seq

    def create_agent(self, pool: str) -> tuple[dict, int] | None:
        body = agent_body(pool, self.owner,
                          SHARED_PROJECTS.pick() if random.random() < 0.3 else None)
        key = str(uuid.uuid4()) if random.random() < 0.2 else None
        headers = {"Idempotency-Key": key} if key else None
        out = self.call("POST", f"{API}/agents", "POST /api/v1/agents", (201,),
                        lambda r: self.check_created_agent(r, body), headers=headers, json=body)
        if out and key:
            first, _ = out

            def replayed(r):
                if r.headers.get("Idempotent-Replayed") != "true":
                    raise Bad(self.describe(r, "retry with the same Idempotency-Key not replayed"))
                if r.json()["id"] != first["id"]:
                    raise Bad(self.describe(r, "idempotent replay answered another agent"))
                return True

            self.call("POST", f"{API}/agents", "POST /api/v1/agents [idempotent replay]",
                      (201,), replayed, headers=headers, json=body)
        return out

    @tag("write")
    @task(5)
    def create_shared_agent(self) -> None:
        out = self.create_agent("shared")
        if out:
            agent, seq = out
            if self.get_agent(agent["id"], min_seq=seq):
                SHARED_AGENTS.add(agent["id"])

    @tag("write")
    @task(4)
    def update_shared_agent(self) -> None:
        agent_id = SHARED_AGENTS.pick()
        if agent_id is None:
            return self.create_shared_agent()
        change = random.choice([
            {"description": f"updated {uuid.uuid4().hex[:8]} by load run {RUN_ID}"},
            {"status": random.choice(STATUSES), "description": f"status change {uuid.uuid4().hex[:6]}"},
            {"capabilities": random.sample(CAPABILITIES, random.randint(1, 5)),
             "config": {"model": "large", "rev": uuid.uuid4().hex[:6]}},
        ])

        def check(r):
            a = r.json()
            seq = self.write_seq(r)
            if r.headers.get("ETag") != etag(a["version"]):
                raise Bad(self.describe(r, "ETag does not match the new version"))
            for k, v in change.items():
                if a[k] != v:
                    raise Bad(self.describe(r, f"update did not set {k}"))
            return a, seq

        out = self.call("PUT", f"{API}/agents/{agent_id}", "PUT /api/v1/agents/{id}", (200,),
                        check, json=change)
        if out:
            a, seq = out
            self.get_agent(agent_id, min_seq=seq, min_version=a["version"])

    @tag("write")
    @task(2)
    def agent_lifecycle(self) -> None:
        """Create, read, update with If-Match, a stale If-Match (412),
        history, delete with If-Match, then 404s."""
        out = self.create_agent("scratch")
        if not out:
            return
        agent, seq = out
        aid = agent["id"]
        path = f"{API}/agents/{aid}"
        if not self.get_agent(aid, min_seq=seq):
            return

        def updated(r):
            a = r.json()
            if a["version"] != 2 or r.headers.get("ETag") != etag(2):
                raise Bad(self.describe(r, f"If-Match update gave version {a['version']}"))
            return a, self.write_seq(r)

        out = self.call("PUT", path, "PUT /api/v1/agents/{id}", (200,), updated,
                        headers={"If-Match": etag(1)},
                        json={"status": "paused", "description": "paused by the lifecycle"})
        if not out:
            return
        _, seq = out
        # The version is 2 now: If-Match "1" is stale and must append nothing.
        self.call("PUT", path, "PUT /api/v1/agents/{id} [stale If-Match]", (412,),
                  headers={"If-Match": etag(1)}, json={"status": "error"})

        def history(r):
            page = self.check_page(r)
            types = [i["type"] for i in page["items"]]
            if types != ["agent.created", "agent.updated"]:
                raise Bad(self.describe(r, f"history {types} after create + update + stale update"))
            return page

        self.call("GET", f"{path}/history", "GET /api/v1/agents/{id}/history", (200,), history,
                  headers={"X-Min-Event-Seq": str(seq)})
        out = self.call("DELETE", path, "DELETE /api/v1/agents/{id}", (204,),
                        lambda r: self.write_seq(r), headers={"If-Match": etag(2)})
        if not out:
            return
        self.expect_gone(path, "GET /api/v1/agents/{id} [deleted]", out)
        self.call("DELETE", path, "DELETE /api/v1/agents/{id} [already deleted]", (404,))

    @tag("write")
    @task(1)
    def bulk(self) -> None:
        n = random.randint(10, 50)
        bodies = [agent_body("shared", self.owner) for _ in range(n)]

        def check(r):
            seq = self.write_seq(r)
            b = r.json()
            if b.get("created") != n or len(b.get("items", [])) != n:
                raise Bad(self.describe(r, f"bulk of {n} answered created={b.get('created')}"))
            return b, seq

        out = self.call("POST", f"{API}/agents/bulk", "POST /api/v1/agents/bulk", (201,), check,
                        json={"agents": bodies})
        if out:
            b, seq = out
            last = b["items"][-1]["id"]
            if self.get_agent(last, min_seq=seq):
                for item in b["items"]:
                    SHARED_AGENTS.add(item["id"])

    # -------------------------------------------------------------- projects

    def check_created_project(self, r) -> tuple[dict, int]:
        p = self.check_project(r)
        if p["version"] != 1 or "agent_count" in p:
            raise Bad(self.describe(r, "new project not at version 1, or counting agents"))
        if not r.headers.get("Location", "").endswith(f"/projects/{p['id']}"):
            raise Bad(self.describe(r, f"Location {r.headers.get('Location')!r}"))
        return p, self.write_seq(r)

    def create_project(self, shared: bool = True) -> tuple[dict, int] | None:
        body = {"name": f"Project {RUN_ID} {random.randint(1, 99999)}",
                "description": "shared by the load run" if shared else "scratch"}
        out = self.call("POST", f"{API}/projects", "POST /api/v1/projects", (201,),
                        self.check_created_project, json=body)
        if out and shared:
            p, seq = out
            if self.call("GET", f"{API}/projects/{p['id']}", "GET /api/v1/projects/{id}",
                         (200,), lambda r: self.check_project(r, p["id"]),
                         headers={"X-Min-Event-Seq": str(seq)}):
                SHARED_PROJECTS.add(p["id"])
        return out

    @tag("write")
    @task(1)
    def project_lifecycle(self) -> None:
        if len(SHARED_PROJECTS) < 20 and random.random() < 0.3:
            self.create_project(shared=True)
        out = self.create_project(shared=False)
        if not out:
            return
        p, seq = out
        path = f"{API}/projects/{p['id']}"
        if not self.call("GET", path, "GET /api/v1/projects/{id}", (200,),
                         lambda r: self.check_project(r, p["id"]),
                         headers={"X-Min-Event-Seq": str(seq)}):
            return

        def updated(r):
            q = self.check_project(r, p["id"], 2)
            return q, self.write_seq(r)

        out = self.call("PUT", path, "PUT /api/v1/projects/{id}", (200,), updated,
                        headers={"If-Match": etag(1)}, json={"name": f"{p['name']} (renamed)"})
        if not out:
            return
        q, seq = out
        self.call("GET", path, "GET /api/v1/projects/{id}", (200,),
                  lambda r: self.check_project(r, p["id"], q["version"]),
                  headers={"X-Min-Event-Seq": str(seq)})
        out = self.call("DELETE", path, "DELETE /api/v1/projects/{id}", (204,),
                        lambda r: self.write_seq(r), headers={"If-Match": etag(q["version"])})
        if out:
            self.expect_gone(path, "GET /api/v1/projects/{id} [deleted]", out)

    # ----------------------------------------------------------------- users

    @tag("users")
    @task(1)
    def users(self) -> None:
        """With the load admin's token: add a viewer, list users, remove it."""
        admin, role = ADMIN.get(self)
        if role != "admin":
            return
        as_admin = {"Authorization": f"Bearer {admin}"}
        name = f"load-{RUN_ID}-{uuid.uuid4().hex[:8]}"

        def created(r):
            u = r.json()
            if u.get("username") != name or u.get("role") != "viewer" or "password" in u \
                    or "password_hash" in u:
                raise Bad(self.describe(r, "created user body"))
            return u

        if not self.call("POST", f"{API}/users", "POST /api/v1/users", (201,), created,
                         headers=as_admin, auth=False,
                         json={"username": name, "password": uuid.uuid4().hex, "role": "viewer"}):
            return

        def listed(r):
            names = [u["username"] for u in r.json()["items"]]
            if name not in names:
                raise Bad(self.describe(r, f"new user {name} not listed"))
            return True

        self.call("GET", f"{API}/users", "GET /api/v1/users", (200,), listed,
                  headers=as_admin, auth=False)
        self.call("DELETE", f"{API}/users/{name}", "DELETE /api/v1/users/{username}", (204,),
                  headers=as_admin, auth=False)


@events.init.add_listener
def _drop_idle_user_classes(environment, **_kw) -> None:
    """With --tags or --exclude-tags, a kind of user left without a task
    (writers under ``--tags read``) is dropped instead of failing the run.
    Locust filters the tasks once, when the users spawn; doing it now is the
    same filtering, earlier."""
    environment._filter_tasks_by_tags()
    kept = [u for u in environment.user_classes if u.tasks]
    if kept:
        environment.user_classes[:] = kept


@events.quitting.add_listener
def _summary(environment, **_kw) -> None:
    """Totals, and the trace report, from the process that has them all."""
    if isinstance(environment.runner, WorkerRunner):
        return
    rows = TRACES.rows()
    path = os.path.join(REPORT_DIR, "ymera_traces.csv")
    fields = ["kind", "name", "response_time_ms", "status", "request_id", "trace_id", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    slowest = [r for r in rows if r["kind"] == "slowest"][:10]
    if slowest:
        print(f"locust: slowest requests and their traces (all in {path}):")
        for r in slowest:
            print(f"locust:   {r['response_time_ms']:>9} ms  {r['name']}  trace_id={r['trace_id']}")
    s = environment.stats.total
    print(f"locust: {s.num_requests} requests, {s.num_failures} failures")
