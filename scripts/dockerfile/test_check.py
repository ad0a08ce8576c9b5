"""Unit tests of the Dockerfile check's parsers: python3 -m unittest discover scripts/dockerfile"""

import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(__file__))

import images  # noqa: E402
from ignore import IgnoreError, ignored, load_patterns  # noqa: E402
from parse import ParseError, stages  # noqa: E402
from steps import StepError, cargo_output_dir, split  # noqa: E402


def rules(text):
    with tempfile.NamedTemporaryFile("w", suffix=".dockerignore", delete=False) as f:
        f.write(text)
    try:
        return load_patterns(f.name)
    finally:
        os.unlink(f.name)


class DockerignoreTest(unittest.TestCase):
    def test_docker_rules_not_gits(self):
        r = rules("# comment\n*.pem\n**/*.key\ntarget/\n/docs\n")
        self.assertTrue(ignored("a.pem", r))
        self.assertFalse(ignored("certs/a.pem", r))       # "*" is top-level only
        self.assertTrue(ignored("a.key", r))              # "**/" may match no directory
        self.assertTrue(ignored("x/y/a.key", r))
        self.assertTrue(ignored("target/release/x", r))   # a directory takes its contents
        self.assertFalse(ignored("tests/target.rs", r))
        self.assertTrue(ignored("docs/a.md", r))
        self.assertFalse(ignored("src/docs/a.md", r))

    def test_last_match_wins(self):
        r = rules("certs/\n!certs/README.md\n")
        self.assertTrue(ignored("certs/gen.sh", r))
        self.assertFalse(ignored("certs/README.md", r))

    def test_unsupported_patterns_are_errors(self):
        with self.assertRaises(IgnoreError):
            rules("*.[ch]\n")


class DockerfileTest(unittest.TestCase):
    def test_continuations_comments_and_stages(self):
        text = ("# syntax=docker/dockerfile:1\nFROM rust:1-bookworm AS b\n"
                "RUN --mount=type=cache,target=/x \\\n# inner comment\n\n    a \\\n && b\n"
                "from scratch\nCOPY --from=b /o /o\n")
        builder, final = stages(text)
        self.assertEqual((builder.image, builder.name, final.image), ("rust:1-bookworm", "b", "scratch"))
        self.assertEqual(builder.instructions[0].args, "--mount=type=cache,target=/x a && b")
        self.assertEqual(final.instructions[0].line, 9)

    def test_heredoc_is_unsupported(self):
        with self.assertRaises(ParseError):
            stages("FROM x\nRUN <<EOF\necho\nEOF\n")

    def test_run_steps(self):
        self.assertEqual(split("a 'b c' && d"), [["a", "b c"], ["d"]])
        for bad in ("a; b", "a || b", "a | b", "a > f", "a $HOME", "a `b`", "a &&"):
            with self.assertRaises(StepError, msg=bad):
                split(bad)

    def test_cargo_output_dir(self):
        self.assertEqual(cargo_output_dir(["--release"]), "target/release")
        self.assertEqual(cargo_output_dir([]), "target/debug")
        self.assertEqual(cargo_output_dir(["--profile=dist", "--target", "x86_64-unknown-linux-musl"]),
                         "target/x86_64-unknown-linux-musl/dist")


class ImagesTest(unittest.TestCase):
    need = ((1, 89, 0), "1.89", "etcd-proxy")
    runtime = "gcr.io/distroless/cc-debian12:nonroot"

    def test_plausible(self):
        for builder in ("rust:1-bookworm", "rust:1.89-bookworm", "rust:1.90.1-slim-bullseye@sha256:00"):
            self.assertEqual(images.check(builder, self.runtime, self.need), [], builder)

    def test_implausible(self):
        static = "gcr.io/distroless/static-debian12"
        for builder, runtime in (("rust:1.88-bookworm", self.runtime),
                                 ("rust:1-trixie", self.runtime),
                                 ("rust:1", self.runtime),
                                 ("rust:1-bookworm", static),
                                 ("rust:1-bookworm", "alpine:3")):
            self.assertEqual(len(images.check(builder, runtime, self.need)), 1, (builder, runtime))


if __name__ == "__main__":
    unittest.main()
