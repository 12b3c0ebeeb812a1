# syntax=docker/dockerfile:1
#
# The `loyalty` binary in a small image: built on the Rust image, run on distroless
# (glibc and CA certificates, no shell, no package manager) as a non-root user.
#
#   docker build -t loyalty:dev .
#   docker run --rm -p 50051:50051 loyalty:dev                       # dev mode, all services
#   docker run --rm loyalty:dev serve --service balance --config /etc/loyalty/config.toml

ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Protobufs are compiled in Rust (no protoc); mimalloc needs only the image's C compiler.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package loyalty --bin loyalty \
    && install -D -m 0755 target/release/loyalty /out/loyalty \
    && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="loyalty" \
      org.opencontainers.image.description="Loyalty engine: identity, balance, promotion, segmentation and reporting over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/loyalty /usr/local/bin/loyalty
# Dev mode keeps its embedded files here; mount a volume over it.
COPY --from=build --chown=65532:65532 /out/data /data
USER 65532:65532
WORKDIR /data
# 50051: gRPC (every service, grpc.health.v1, reflection); 9090: Prometheus /metrics.
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/loyalty"]
CMD ["dev", "--listen", "0.0.0.0:50051", "--data-dir", "/data"]
