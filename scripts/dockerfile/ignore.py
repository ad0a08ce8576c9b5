"""The Docker build context: the repository's files filtered through .dockerignore.

Docker's rules (moby/patternmatcher), which differ from .gitignore's:
  * a pattern is matched against the whole path from the context root ("*.pem" is
    top-level only; "**/*.pem" is anywhere), after a leading "/" and a trailing "/" are
    dropped;
  * "*" and "?" do not cross "/", "**/" matches any number of directories (even none), and
    a trailing "**" matches everything below;
  * a pattern that matches a directory excludes everything under it;
  * "!pattern" re-includes, and the last matching line wins.
Character classes ("[...]") and "\\" escapes are not supported and are reported as errors,
so a pattern this module would misread cannot pass silently.
"""

import os
import posixpath
import re
import subprocess


class IgnoreError(Exception):
    pass


def _compile(pattern):
    """A regex for one cleaned pattern (no "!")."""
    if "[" in pattern or "\\" in pattern:
        raise IgnoreError(f".dockerignore pattern {pattern!r}: [...] and \\ are not supported")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def load_patterns(path):
    """[(regex, excluding)] from a .dockerignore file, in order (none if it is missing)."""
    rules = []
    if not os.path.exists(path):
        return rules
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            excluding = not line.startswith("!")
            if not excluding:
                line = line[1:].strip()
            line = posixpath.normpath(line.lstrip("/")) if line.strip("/") else "."
            rules.append((_compile(line), excluding))
    return rules


def ignored(path, rules):
    """Whether a file (a path relative to the context root) is left out of the context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for regex, excluding in rules:
        if any(regex.match(p) for p in prefixes):
            result = excluding
    return result


def tracked_files(root):
    """The files a clean checkout has: git's tracked files that exist in the work tree, or
    every file when `root` is not a git checkout (e.g. an exported source tree)."""
    out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached"], capture_output=True)
    if out.returncode == 0:
        paths = set(out.stdout.decode().split("\0"))
    else:
        paths = {os.path.relpath(os.path.join(d, f), root)
                 for d, _, names in os.walk(root) for f in names}
    return sorted(p for p in paths if p and os.path.isfile(os.path.join(root, p)))


def context_files(root):
    """The build context of a clean checkout of `root`, as sorted relative paths."""
    rules = load_patterns(os.path.join(root, ".dockerignore"))
    return [p for p in tracked_files(root) if not ignored(p, rules)]
