"""Sorts the errors of a Schemathesis run: ours, or the fuzzer's own engine.

    python3 engine_errors.py schemathesis.log

Schemathesis reports an exception raised while it generates or shrinks test
cases as an "error" of the operation it was fuzzing, beside the check
failures. Some of those are defects of the Hypothesis engine itself, for
example an IndexError in its shrinker while it optimises targets (seen in
Hypothesis 6.170.17, `try_trivial_spans`). They say nothing about the API,
but they cut that operation's fuzzing short, so scripts/fuzz.sh runs the
operation again instead of failing or ignoring it.

Prints one line per engine error: the operation's name (`METHOD /path`), as
`--include-name` takes it. Exits 0 when every error is such an engine error,
1 when any is not (an error of ours, or one this script cannot place), so
that only the engine's own defects are retried. Anything raised from
Hypothesis's public layer (Flaky, health checks, deadlines) is not an engine
error: a flaky result can be a real, intermittent defect of the API.
"""

import re
import sys

# The innermost frame of the traceback must lie in the engine's internals.
ENGINE = re.compile(r"/site-packages/hypothesis/internal/conjecture/")
FRAME = re.compile(r'^\s*File "([^"]+)", line \d+')
SECTION = re.compile(r"^=+ (.+?) =+$")
OPERATION = re.compile(r"^_+ (.+?) _+$")


def errors(lines):
    """Yields (operation, block lines) for each entry of the ERRORS section."""
    in_errors = False
    name, block = None, []
    for line in lines:
        section = SECTION.match(line)
        if section:
            if in_errors and name is not None:
                yield name, block
                name, block = None, []
            in_errors = section.group(1) == "ERRORS"
            continue
        if not in_errors:
            continue
        operation = OPERATION.match(line)
        if operation:
            if name is not None:
                yield name, block
            name, block = operation.group(1), []
        elif name is not None:
            block.append(line)
    if in_errors and name is not None:
        yield name, block


def is_engine_error(block):
    frames = [m.group(1) for m in map(FRAME.match, block) if m]
    return bool(frames) and ENGINE.search(frames[-1]) is not None


def main(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    ours = 0
    for name, block in errors(lines):
        if is_engine_error(block):
            print(name)
        else:
            ours += 1
            print(f"not an engine error: {name}", file=sys.stderr)
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
