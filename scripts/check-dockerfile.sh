#!/usr/bin/env bash
# Check that the Dockerfile still builds, without Docker (CI has no engine):
#
#   bash scripts/check-dockerfile.sh          # the Dockerfile of this checkout
#
# 1. Copies the build context a clean checkout would send (git-tracked files, or all files
#    outside a git checkout, filtered by .dockerignore with Docker's pattern rules) into
#    $CARGO_TARGET_DIR/dockerfile-check.
# 2. Replays the builder stage there: COPY, ENV, and each RUN with its --mount flags dropped.
#    `cargo build` runs as `cargo check` with the same arguments (--release --locked --bin …):
#    that loads the manifest and every target it declares, enforces the lockfile, and runs
#    build scripts and the compiler's checks on the image's crates, which is where a manifest
#    or context change breaks the image. It skips code generation and the fat-LTO link, which
#    would add several minutes per CI run on 2 cores for what `cargo test` already compiles.
#    `cp target/...` is checked against the cargo build before it instead of run.
# 3. Checks the runtime stage from the text: what it copies from the builder was written
#    there, ENTRYPOINT is one of those files, USER is not root, and the base images fit
#    (the Rust image's version covers rust-version, the builder's Debian release is not
#    newer than the runtime's).
#
# Not covered: anything that needs the real base images (system packages the build would
# need inside rust:…, the registry being reachable from the builder).
#
# The parsers behind it have unit tests (scripts/dockerfile/test_check.py), run first.
#
# Exit status 0 when the image would build; 1 with "check-dockerfile: …" lines otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v python3 >/dev/null || { echo "check-dockerfile: python3 is required" >&2; exit 1; }

# The same target dir on every run, so dependencies are checked once, not per run.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/etcd-proxy-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
mkdir -p "$CARGO_TARGET_DIR"

export PYTHONDONTWRITEBYTECODE=1
start=$SECONDS
if ! python3 -m unittest discover -s scripts/dockerfile -q 2>/dev/null; then
  python3 -m unittest discover -s scripts/dockerfile || true
  echo "check-dockerfile: its own unit tests fail" >&2
  exit 1
fi
# Checkouts sharing the target dir share the replay's directory too: one replay at a time.
lock=()
command -v flock >/dev/null && lock=(flock "$CARGO_TARGET_DIR/dockerfile-check.lock")
if "${lock[@]}" python3 scripts/dockerfile/check.py . "$CARGO_TARGET_DIR/dockerfile-check"; then
  echo "check-dockerfile: ok ($((SECONDS - start)) s)"
else
  echo "check-dockerfile: FAILED (see above; in a git checkout the build context is the" \
    "tracked files only)" >&2
  exit 1
fi
