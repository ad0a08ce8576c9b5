# syntax=docker/dockerfile:1
# etcd-proxy container image, e.g. for the in-cluster gateway (deploy/gateway.yaml):
#
#   docker build -t etcd-proxy:latest .
#   docker run --rm etcd-proxy:latest --help
#
# Two stages: a Rust builder, and a distroless runtime with nothing but the binary, glibc and
# CA certificates, running as the unprivileged "nonroot" user (uid/gid 65532).

FROM rust:1-bookworm AS builder
WORKDIR /build

# 1. Dependencies only, so this layer is rebuilt when Cargo.toml/Cargo.lock change, not on
#    every source edit. The workspace manifest names tests/sim and the benches, so Cargo needs
#    their manifest and target files to exist: stub them.
COPY Cargo.toml Cargo.lock ./
COPY tests/sim/Cargo.toml tests/sim/Cargo.toml
RUN mkdir -p src benches tests/sim/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs tests/integration.rs tests/sim/src/lib.rs \
 && echo 'fn main() {}' > tests/sim/src/main.rs \
 && echo 'fn main() {}' > benches/startup.rs \
 && echo 'fn main() {}' > benches/resilience.rs \
 && cargo build --release --locked --bin etcd-proxy \
 && rm -rf src benches tests \
      target/release/etcd-proxy* \
      target/release/deps/etcd_proxy-* target/release/deps/libetcd_proxy-* \
      target/release/.fingerprint/etcd-proxy-*

# 2. The real sources. COPY keeps the files' own modification times, which can be older than
#    the stubs' build, so the local crate's fingerprints were removed above to force a rebuild.
COPY . .
RUN cargo build --release --locked --bin etcd-proxy \
 && cp target/release/etcd-proxy /etcd-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /etcd-proxy /etcd-proxy
USER nonroot:nonroot
# The gateway's cluster endpoint (deploy/gateway.yaml runs --listen 0.0.0.0:2379).
EXPOSE 2379
ENTRYPOINT ["/etcd-proxy"]
