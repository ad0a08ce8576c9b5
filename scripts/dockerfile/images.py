"""Plausibility checks of the base images, from their names alone (no registry access).

  * the builder is the official rust image; a pinned Rust version must be at least the
    highest rust-version among the crates the image compiles;
  * the builder names its Debian release, and that release is not newer than the runtime's
    (the binary needs the builder's glibc version or a later one at run time);
  * the runtime image has glibc (distroless cc/base, or Debian itself).
Images outside these tables are errors: extend the tables when switching images.
"""

import re

DEBIAN = {"bullseye": 11, "bookworm": 12, "trixie": 13}
RUST_REPOS = ("rust", "docker.io/library/rust", "library/rust", "docker.io/rust")


def _split(image):
    """(repository, tag) of an image reference, without any @digest."""
    image = image.split("@", 1)[0]
    repo, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return repo, tag


def rust_version(tag):
    """(major, minor, patch) pinned by a rust image tag, or None for a floating tag."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(?:-|$)", tag)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def debian_release(image):
    """The Debian release number an image is built on, or None when it does not say."""
    repo, tag = _split(image)
    m = re.search(r"distroless/(?:cc|base|base-nossl)-debian(\d+)$", repo)
    if m:
        return int(m.group(1))
    for name, number in DEBIAN.items():
        if re.search(rf"(?:^|-){name}(?:-|$)", tag):
            return number
    return None


def check(builder, runtime, needed):
    """Error lines for the builder and runtime image names; `needed` is (version tuple,
    version text, crate): the Rust version the compiled crates require, and which does."""
    errors = []
    repo, tag = _split(builder)
    if repo not in RUST_REPOS:
        return [f"builder image {builder}: not the official rust image; extend images.py"]
    pinned = rust_version(tag)
    version, text, crate = needed
    if pinned and pinned < version:
        errors.append(f"builder image {builder}: Rust {tag.split('-')[0]} is older than "
                      f"{text}, the highest rust-version among the crates it compiles ({crate})")
    built_on = debian_release(builder)
    if built_on is None:
        errors.append(f"builder image {builder}: name the Debian release in the tag "
                      f"(e.g. rust:1-bookworm) so it can be matched to the runtime's glibc")
    runtime_repo, _ = _split(runtime)
    runs_on = debian_release(runtime)
    has_glibc = "distroless/" in runtime_repo or runtime_repo in ("debian", "docker.io/library/debian")
    if runs_on is None or not has_glibc:
        errors.append(f"runtime image {runtime}: not a known glibc image "
                      f"(distroless cc/base or debian, with its release); extend images.py")
    elif built_on is not None and built_on > runs_on:
        errors.append(f"builder image {builder} (Debian {built_on}) is newer than runtime "
                      f"image {runtime} (Debian {runs_on}): the binary would need a newer glibc")
    return errors
