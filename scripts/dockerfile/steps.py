"""Replaying one builder RUN instruction outside a container.

A RUN command is a list of simple commands joined by "&&". Each runs in the copy of the
build context, except:
  * `cargo build ARGS` runs as `cargo check ARGS`: the same manifest, lockfile, target
    selection and build scripts, without code generation and fat LTO, which would cost CI
    minutes per run (see scripts/check-dockerfile.sh);
  * `cp`/`install` from cargo's output directory is checked against the cargo build before
    it (profile, target triple, binary name) instead of run, as `cargo check` writes no
    binaries, and a destination outside the working directory is only recorded.
Anything else (other shell syntax, unknown programs, absolute paths) is an error, so a RUN
step this replay cannot reproduce is reported instead of skipped: extend this file.
"""

import os
import posixpath
import shlex
import subprocess

# Programs run as they are, in the copy of the context, with relative paths only.
PLAIN = {"find", "touch", "mkdir", "rm", "ls", "true", "echo", "test"}


class StepError(Exception):
    pass


def split(command):
    """The simple commands of `a && b && c`, each as an argv list."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    steps, argv = [], []
    for token in lexer:
        if token == "&&":
            steps.append(argv)
            argv = []
        elif (token and set(token) <= set("();<>|&")) or "$" in token or "`" in token:
            raise StepError(f"shell syntax {token!r} is not supported (only `a && b`)")
        else:
            argv.append(token)
    steps.append(argv)
    if any(not s for s in steps):
        raise StepError("empty command around &&")
    return steps


def _option(args, *names):
    """Values of an option given as `--name value` or `--name=value`."""
    values = []
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                values.append(args[i + 1])
            elif a.startswith(n + "="):
                values.append(a[len(n) + 1:])
    return values


def cargo_output_dir(args):
    """Where `cargo build ARGS` puts its binaries, relative to the workspace root."""
    profiles = _option(args, "--profile")
    profile = profiles[-1] if profiles else ("release" if {"--release", "-r"} & set(args) else "dev")
    triples = _option(args, "--target")
    if len(triples) > 1:
        raise StepError("cargo build with several --target is not supported")
    parts = ["target"] + triples + ["debug" if profile == "dev" else profile]
    return "/".join(parts)


class Runner:
    def __init__(self, root, workdir, env, cargo, find_bins):
        self.root = root          # the copy of the context, standing for `workdir`
        self.workdir = workdir    # the container path of the working directory
        self.env = env
        self.cargo = cargo
        self.find_bins = find_bins  # -> every [[bin]] name in the workspace, once it is there
        self.bins = None
        self.produced = {}        # container path -> binary name, for the final stage

    def run(self, command):
        built = {}                # cargo output dir -> binary names, within this RUN
        for argv in split(command):
            if argv[0] == "cargo":
                self._cargo(argv[1:], built)
            elif argv[0] in ("cp", "install"):
                self._copy(argv, built)
            elif argv[0] in PLAIN:
                if any(a.startswith("/") for a in argv[1:]):
                    raise StepError(f"{shlex.join(argv)}: absolute paths are not supported")
                self._exec(argv)
            else:
                raise StepError(f"{shlex.join(argv)}: the replay does not know {argv[0]!r}")

    def _exec(self, argv, shown=None):
        result = subprocess.run(argv, cwd=self.root, env=self.env)
        if result.returncode != 0:
            raise StepError(f"{shown or shlex.join(argv)} exited with status {result.returncode}")

    def _cargo(self, args, built):
        sub = next((i for i, a in enumerate(args) if not a.startswith(("-", "+"))), None)
        if sub is None or args[sub] != "build":
            self._exec([self.cargo] + args)
            return
        rest = args[sub + 1:]
        if "--locked" not in args:
            raise StepError("cargo build in the image must use --locked (the lockfile CI tests)")
        if self.bins is None:
            self.bins = self.find_bins()
        names = _option(rest, "--bin") or sorted(self.bins)
        unknown = sorted(set(names) - self.bins)
        if unknown:
            raise StepError(f"cargo build --bin {' '.join(unknown)}: no such binary in Cargo.toml")
        check = [self.cargo] + args[:sub] + ["check"] + rest
        self._exec(check, f"cargo {shlex.join(args)} (replayed as `{shlex.join(check)}`)")
        built.setdefault(cargo_output_dir(rest), set()).update(names)

    def _copy(self, argv, built):
        paths = [a for a in argv[1:] if not a.startswith("-")]
        if len(paths) < 2:
            raise StepError(f"{shlex.join(argv)}: expected SOURCE... DEST")
        *sources, dest = paths
        for src in sources:
            target = dest
            if dest.endswith("/") or len(sources) > 1:
                target = posixpath.join(dest, posixpath.basename(src))
            target = posixpath.normpath(posixpath.join(self.workdir, target))
            outdir, _, name = posixpath.normpath(src).rpartition("/")
            if outdir.startswith("target/") or outdir == "target":
                if name not in built.get(outdir, ()):
                    made = "; ".join(f"{d}/{n}" for d, ns in sorted(built.items()) for n in sorted(ns))
                    raise StepError(f"{shlex.join(argv)}: no cargo build before it in this RUN "
                                    f"writes {src} (it writes: {made or 'nothing'})")
                self.produced[target] = name
            elif not os.path.exists(os.path.join(self.root, src)):
                raise StepError(f"{shlex.join(argv)}: {src} is not in the build context")
            else:
                self.produced[target] = None
