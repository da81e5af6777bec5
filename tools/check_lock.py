"""The lock files must match the pins they were generated from: this checks that (tests/test_lock.py tests the check).

requirements.txt and requirements-dev.txt are the short lists a person edits; `make lock` turns them into
requirements.lock and requirements-dev.lock (every package, exact versions, hashes), which `make setup` and
`make dev` install. A pin edited without `make lock` would leave the lock installing something else, silently:
this check names every direct pin that is missing from its lock or locked at another version, every locked
package without hashes, every package that the two locks pin differently, and a uv bootstrap lock
(requirements-uv.lock) that is not at the Makefile's UV_VERSION.

It uses the standard library only, so it also runs before any environment exists:
`python3 tools/check_lock.py` prints the problems and exits 1 (CI and `make setup` run it that way).
"""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# (what a person edits, what `make lock` generates from it)
PAIRS = (("requirements.txt", "requirements.lock"), ("requirements-dev.txt", "requirements-dev.lock"))

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;\\#]+)\s*(;[^\\#]*)?")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def normalize(name):
    """PEP 503 name, so that `Jinja2`, `jinja2` and `nest_asyncio2`/`nest-asyncio2` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def direct_pins(text, read_include=None):
    """{name: version} of the `name==version` lines of a requirements file, and the problems found.

    `-r other.txt` lines are followed through read_include(filename) -> text. A requirement that is not an
    exact pin is a problem: the human files pin every direct dependency exactly.
    """
    pins, problems = {}, []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            if read_include is None:
                problems.append(f"cannot follow {line!r}")
                continue
            sub_pins, sub_problems = direct_pins(read_include(line.split(None, 1)[1]), read_include)
            pins.update(sub_pins)
            problems += sub_problems
            continue
        match = _PIN.match(line)
        if match is None:
            problems.append(f"{line!r} is not an exact pin (name==version)")
            continue
        pins[normalize(match.group(1))] = match.group(2)
    return pins, problems


def locked_entries(text):
    """[(name, version, marker, number of hashes)] of a lock file written by `uv pip compile --generate-hashes`.

    A package can appear more than once, with different markers (e.g. one version for Python < 3.12).
    """
    entries = []
    for line in text.splitlines():
        if line.startswith((" ", "#", "-")) or not line.strip():
            if entries and _HASH.search(line):
                name, version, marker, hashes = entries[-1]
                entries[-1] = (name, version, marker, hashes + len(_HASH.findall(line)))
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"unexpected line in a lock file: {line!r}")
        marker = (match.group(3) or "").lstrip(";").strip()
        entries.append((normalize(match.group(1)), match.group(2), marker, len(_HASH.findall(line))))
    return entries


def pin_problems(pins, entries, req_name, lock_name):
    """Each direct pin must be in the lock, and only at the pinned version."""
    locked = {}
    for name, version, _marker, _hashes in entries:
        locked.setdefault(name, set()).add(version)
    problems = []
    for name, version in sorted(pins.items()):
        if name not in locked:
            problems.append(f"{req_name} pins {name}=={version}, which {lock_name} does not contain")
        elif locked[name] != {version}:
            found = ", ".join(sorted(locked[name]))
            problems.append(f"{req_name} pins {name}=={version}, but {lock_name} has {name}=={found}")
    return problems


def hash_problems(entries, lock_name):
    """Hash checking needs at least one hash on every entry."""
    return [f"{lock_name}: {name}=={version} has no --hash" for name, version, _m, hashes in entries if not hashes]


def consistency_problems(runtime_entries, dev_entries):
    """The dev lock must install the runtime packages exactly as the runtime lock does."""
    dev = {(name, version, marker) for name, version, marker, _h in dev_entries}
    return [
        f"requirements.lock has {name}=={version}{' ; ' + marker if marker else ''}, "
        f"requirements-dev.lock does not"
        for name, version, marker, _h in runtime_entries
        if (name, version, marker) not in dev
    ]


def uv_problems(makefile_text, uv_lock_text):
    """`make setup` installs uv from requirements-uv.lock; it must be the Makefile's UV_VERSION, hashed."""
    match = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", makefile_text, re.M)
    if match is None:
        return ["the Makefile sets no UV_VERSION"]
    entries = locked_entries(uv_lock_text)
    return pin_problems({"uv": match.group(1)}, entries, "the Makefile's UV_VERSION", "requirements-uv.lock") + (
        hash_problems(entries, "requirements-uv.lock")
    )


def check(repo=REPO):
    """Every problem with the lock files of the checkout at `repo`; an empty list means they match."""
    repo = Path(repo)

    def read(name):
        return (repo / name).read_text(encoding="utf-8")

    problems, entries = [], {}
    for req_name, lock_name in PAIRS:
        if not (repo / lock_name).exists():
            problems.append(f"{lock_name} is missing")
            continue
        pins, pin_errors = direct_pins(read(req_name), read)
        entries[lock_name] = locked_entries(read(lock_name))
        problems += [f"{req_name}: {e}" for e in pin_errors]
        problems += pin_problems(pins, entries[lock_name], req_name, lock_name)
        problems += hash_problems(entries[lock_name], lock_name)
    if len(entries) == len(PAIRS):
        problems += consistency_problems(entries["requirements.lock"], entries["requirements-dev.lock"])
    if (repo / "requirements-uv.lock").exists():
        problems += uv_problems(read("Makefile"), read("requirements-uv.lock"))
    else:
        problems.append("requirements-uv.lock is missing")
    return problems


if __name__ == "__main__":
    found = check()
    for problem in found:
        print(f"lock check: {problem}", file=sys.stderr)
    if found:
        print("lock check: the lock files do not match requirements*.txt: run `make lock`, then commit the "
              "requirements*.txt and requirements*.lock files together", file=sys.stderr)
        sys.exit(1)
    print("lock check: requirements.lock, requirements-dev.lock and requirements-uv.lock match their pins")
