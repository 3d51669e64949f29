"""Schemathesis hooks for scripts/fuzz.sh.

positive_data_acceptance says that a request the spec calls valid must not
be refused. A few refusals depend on the server's state, which no schema can
express; they are the contract (api.md), not findings. This hook drops
exactly those, recognised by status and problem text, and nothing else:

- 400 "min_seq N is beyond the end of the log (M)": `min_seq` and
  `X-Min-Event-Seq` name a stream sequence; one the log has not reached yet
  can never be waited for.
- 400 "the cursor is not valid": `cursor` is the opaque `next_cursor` of a
  previous page, issued by the server (like an id), not something to invent.
- 412 on `If-Match`: the ETag names a version other than the current one.
- 422 whose only errors are `project_id: no such project`: an agent's
  `project_id` must name a project that exists in the log.
- 422 whose only errors are `current_password: is not your current
  password` on `POST /auth/password`: only the caller knows it.

And one account is left alone: the one the fuzzer is logged in as
(`YMERA_ADMIN_USERNAME`, default `admin`). Changing its password or role, or
deleting it, would revoke the fuzzer's own token and turn the rest of the
run into 401s, so no case names it in `/users/{username}`.

And one rule between parameters, which a schema of each cannot express:

- 400 "from must be before to" and "from..to spans N <bucket> buckets; at
  most 10000 are allowed" on `GET /analytics`.
"""

import json
import os
import re

import schemathesis

_MIN_SEQ = re.compile(r"^min_seq \d+ is beyond the end of the log \(\d+\)$")
_SPAN = re.compile(r"^from\.\.to spans \d+ \w+ buckets; at most \d+ are allowed")


def _problem(response):
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return None
    return body if isinstance(body, dict) else None


def state_dependent(response) -> bool:
    """Whether the response is one of the refusals of state listed above."""
    problem = _problem(response)
    if problem is None:
        return False
    status = response.status_code
    detail = problem.get("detail") or ""
    if status == 400:
        return (
            bool(_MIN_SEQ.match(detail))
            or detail == "the cursor is not valid"
            or detail == "from must be before to"
            or bool(_SPAN.match(detail))
        )
    if status == 412:
        return problem.get("type") == "urn:ymera:problem:precondition-failed"
    if status == 422:
        errors = problem.get("errors") or []
        return bool(errors) and all(
            (e.get("field"), e.get("message"))
            in (
                ("project_id", "no such project"),
                ("current_password", "is not your current password"),
            )
            for e in errors
        )
    return False


@schemathesis.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but positive_data_acceptance's refusals of state."""
    if type(failure).__name__ == "RejectedPositiveData":
        return not state_dependent(response)
    return True


_FUZZER = os.environ.get("YMERA_ADMIN_USERNAME", "admin")


@schemathesis.hook
def filter_path_parameters(context, path_parameters) -> bool:
    """No case changes or deletes the account the fuzzer is logged in as."""
    return (path_parameters or {}).get("username") != _FUZZER
