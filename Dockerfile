# syntax=docker/dockerfile:1
# etcd-proxy container image, e.g. for the in-cluster gateway (deploy/gateway.yaml). Needs
# BuildKit (the default builder since Docker 23) for the cache mounts:
#
#   docker build -t etcd-proxy:latest .
#   docker run --rm etcd-proxy:latest --help
#
# Two stages: a Rust builder, and a distroless runtime with nothing but the binary, glibc and
# CA certificates, running as the unprivileged "nonroot" user (uid/gid 65532).
#
# CI cannot run Docker, so scripts/check-dockerfile.sh replays the builder's COPY and RUN
# steps on a clean copy of the build context: keep them to the simple forms it understands.

# The builder's Debian release (bookworm = 12) must not be newer than the runtime's, whose
# glibc the binary links against. `1` is the newest stable Rust, which satisfies rust-version.
FROM rust:1-bookworm AS builder
WORKDIR /build

# The whole build context (.dockerignore keeps out target/, .git, keys and docs), so every
# target Cargo.toml declares is there as it is in a checkout: no stubs to keep in step. The
# crate registry and target/ are cache mounts instead of a dependencies-only layer, so a
# source edit recompiles the local crates, not the dependencies. Cargo decides freshness by
# modification time, and COPY keeps the context's times, which can be older than a previous
# build's output in the shared target/ cache: touching the copied files first makes the local
# crates always rebuild (they are relinked with LTO anyway). target/ is not part of the
# image, so the binary is copied out in the same step.
COPY . .
RUN --mount=type=cache,id=etcd-proxy-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=etcd-proxy-target,target=/build/target,sharing=locked \
    find . -path ./target -prune -o -exec touch {} + \
 && cargo build --release --locked --bin etcd-proxy \
 && cp target/release/etcd-proxy /etcd-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /etcd-proxy /etcd-proxy
USER nonroot:nonroot
# The gateway's cluster endpoint (deploy/gateway.yaml runs --listen 0.0.0.0:2379).
EXPOSE 2379
ENTRYPOINT ["/etcd-proxy"]
