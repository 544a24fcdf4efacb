# syntax=docker/dockerfile:1
# The sluice container image: build with the Rust toolchain, run on distroless (glibc, CA
# certificates, a non-root user, no shell). Build from the repository root:
#   docker build -t sluice .
# The binary links glibc, libm, libgcc_s and OpenSSL 3 (librdkafka's TLS), which
# distroless/cc provides; zlib is built in statically.

FROM rust:1.95-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config make g++ perl libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
 && cp target/release/sluice /usr/local/bin/sluice \
 && strip /usr/local/bin/sluice

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
# distroless' nonroot user; the Helm chart runs it with a read-only root filesystem and
# mounts /etc/sluice (config), /var/lib/sluice/spill and /tmp.
USER 65532:65532
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "--config", "/etc/sluice/sluice.toml"]
