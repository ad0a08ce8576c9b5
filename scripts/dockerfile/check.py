"""Check the Dockerfile without Docker; run by scripts/check-dockerfile.sh (which explains it).

  python3 scripts/dockerfile/check.py REPO OUT

Copies REPO's build context (git-tracked files through .dockerignore) to OUT/context,
replays the builder stage's WORKDIR/ENV/COPY/RUN instructions in OUT/build (see
steps.py), then checks the runtime stage: each file it copies from the builder was written
there, its entrypoint is one of those files, it runs as a non-root user, and the base images
fit together (images.py). Prints one line per problem and exits 1 on any.
"""

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys

import images
from ignore import IgnoreError, context_files
from parse import ParseError, stages
from steps import Runner, StepError

# Environment that moves cargo's output; the final stage's paths would no longer be checked.
LAYOUT_ENV = {"CARGO_TARGET_DIR", "CARGO_BUILD_TARGET", "CARGO_BUILD_TARGET_DIR"}


class CheckError(Exception):
    pass


def cargo_json(cwd, *args):
    out = subprocess.run(["cargo", "metadata", "--format-version", "1", *args], cwd=cwd,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckError(f"cargo metadata in the context copy failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def bin_names(build):
    meta = cargo_json(build, "--no-deps")
    return {t["name"] for p in meta["packages"] for t in p["targets"] if "bin" in t["kind"]}


def copy_into(context, files, sources, dest, workdir, root, build):
    """COPY sources... dest, from the context copy into `root` (standing for the first WORKDIR)."""
    for src in sources:
        if re.search(r"[*?\[$]", src + dest):
            raise CheckError(f"COPY {src} {dest}: wildcards and variables are not supported")
        src = posixpath.normpath(src.lstrip("/")) if src.strip("/") else "."
        if src == ".":
            picked = {f: f for f in files}
        elif src in files:
            into_dir = dest.endswith("/") or len(sources) > 1
            picked = {src: posixpath.basename(src) if into_dir else ""}
        else:
            picked = {f: f[len(src) + 1:] for f in files if f.startswith(src + "/")}
        if not picked:
            raise CheckError(f"COPY {src}: not in the build context (tracked files "
                             f"minus .dockerignore)")
        base = posixpath.normpath(posixpath.join(workdir, dest))
        if base != root and not base.startswith(root.rstrip("/") + "/"):
            raise CheckError(f"COPY to {dest}: outside the first WORKDIR {root}")
        for f, rel in picked.items():
            local = os.path.join(build, posixpath.relpath(posixpath.join(base, rel), root))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            shutil.copy2(os.path.join(context, f), local)


def replay_builder(stage, context, files, build):
    root = workdir = None
    env = dict(os.environ)
    runner = None
    for ins in stage.instructions:
        where = f"line {ins.line}: {ins.keyword}"
        try:
            if ins.keyword == "WORKDIR":
                workdir = posixpath.normpath(posixpath.join(workdir or "/", ins.args))
                root = root or workdir
                if workdir != root and not workdir.startswith(root.rstrip("/") + "/"):
                    raise CheckError(f"{workdir} is outside the first WORKDIR {root}")
                os.makedirs(os.path.join(build, posixpath.relpath(workdir, root)), exist_ok=True)
            elif ins.keyword in ("ARG", "LABEL"):
                continue
            elif root is None:
                raise CheckError("comes before WORKDIR: the replay needs a working directory")
            elif ins.keyword == "ENV":
                words = shlex.split(ins.args) or [""]
                if "=" in words[0]:
                    pairs = [w.split("=", 1) for w in words]
                else:  # the legacy `ENV KEY value` form
                    pairs = [[words[0], " ".join(words[1:])]]
                for key, value in pairs:
                    if key in LAYOUT_ENV:
                        raise CheckError(f"{key} moves cargo's output; not supported")
                    env[key] = value
            elif ins.keyword == "COPY":
                flags, words = ins.flags_and_words()
                if any(f.startswith("--from") for f in flags):
                    raise CheckError("COPY --from in the builder is not supported")
                copy_into(context, files, words[:-1], words[-1], workdir, root, build)
            elif ins.keyword == "RUN":
                command = re.sub(r"^(?:--(?:mount|network|security)=\S+\s+)*", "", ins.args)
                if command.startswith(("[", "--")):
                    raise CheckError("only the shell form with --mount/--network flags is supported")
                if runner is None:
                    runner = Runner(None, root, env, "cargo", lambda: bin_names(build))
                runner.root = os.path.join(build, posixpath.relpath(workdir, root))
                runner.workdir = workdir
                runner.run(command)
            else:
                raise CheckError("is not supported in the builder stage; "
                                 "extend scripts/dockerfile/check.py")
        except (CheckError, StepError, ValueError) as e:
            raise CheckError(f"{where}: {e}")
    if runner is None:
        raise CheckError("the builder stage has no RUN step")
    return runner


def needed_rust(produced, build):
    """(version, its text, crate): the highest rust-version among the crates the copied
    binaries are compiled from (normal and build dependencies on this host's platform)."""
    host = re.search(r"^host: (\S+)", subprocess.run(["rustc", "-vV"], capture_output=True,
                                                     text=True, check=True).stdout, re.M).group(1)
    meta = cargo_json(build, "--locked", "--filter-platform", host)
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    todo = [p["id"] for p in meta["packages"] if p["id"] in meta["workspace_members"]
            and any("bin" in t["kind"] and t["name"] in produced for t in p["targets"])]
    seen, best = set(), ((0, 0, 0), "", "nothing")
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        rv = packages[pid].get("rust_version")
        if rv:
            version = tuple(int(x) for x in (rv.split(".") + ["0", "0"])[:3])
            best = max(best, (version, rv, packages[pid]["name"]))
        todo += [d["pkg"] for d in nodes[pid]["deps"]
                 if any(k["kind"] in (None, "build") for k in d["dep_kinds"])]
    return best


def check_runtime(stage, builder, runner):
    errors, copied, user, entry = [], set(), None, None
    for ins in stage.instructions:
        if ins.keyword == "COPY":
            flags, words = ins.flags_and_words()
            origin = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
            *sources, dest = words
            for src in sources:
                if origin and origin[0] not in (builder.name, "0"):
                    errors.append(f"line {ins.line}: COPY --from={origin[0]}: "
                                  f"not the builder stage")
                elif origin and posixpath.normpath(src) not in runner.produced:
                    made = ", ".join(sorted(runner.produced)) or "nothing"
                    errors.append(f"line {ins.line}: COPY --from={origin[0]} {src}: the builder "
                                  f"writes no such file (it writes: {made})")
                into_dir = dest.endswith("/") or len(sources) > 1
                copied.add(posixpath.join(dest, posixpath.basename(src)) if into_dir else dest)
        elif ins.keyword == "USER":
            user = ins.args.split(":")[0].strip()
        elif ins.keyword == "ENTRYPOINT":
            try:
                words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
            except ValueError as e:
                raise CheckError(f"line {ins.line}: ENTRYPOINT: {e}")
            entry = words[0] if words else None
    if user is None or user in ("root", "0"):
        errors.append(f"runtime stage (line {stage.line}): runs as root; keep a non-root USER")
    if entry is None or entry not in copied:
        errors.append(f"runtime stage (line {stage.line}): ENTRYPOINT {entry} "
                      f"is not a file it copies")
    return errors


def main(repo, work):
    with open(os.path.join(repo, "Dockerfile"), encoding="utf-8") as f:
        all_stages = stages(f.read())
    if len(all_stages) != 2:
        raise CheckError(f"Dockerfile has {len(all_stages)} stages; "
                         f"the check knows two (builder, runtime)")
    builder, runtime = all_stages
    files = context_files(repo)
    shutil.rmtree(work, ignore_errors=True)
    context = os.path.join(work, "context")
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(context, f)), exist_ok=True)
        shutil.copy2(os.path.join(repo, f), os.path.join(context, f))
    build = os.path.join(work, "build")
    os.makedirs(build)
    print(f"check-dockerfile: build context: {len(files)} files; replaying the builder stage",
          flush=True)
    runner = replay_builder(builder, context, files, build)
    errors = check_runtime(runtime, builder, runner)
    binaries = {n for n in runner.produced.values() if n}
    errors += images.check(builder.image, runtime.image, needed_rust(binaries, build))
    return errors


if __name__ == "__main__":
    try:
        problems = main(os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2]))
    except (CheckError, ParseError, IgnoreError, StepError, ValueError) as e:
        problems = [str(e)]
    for p in problems:
        print(f"check-dockerfile: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)
