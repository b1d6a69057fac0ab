# syntax=docker/dockerfile:1
# nodedrain: a static binary on a distroless base, running as non-root.
#
#   docker build -t nodedrain:dev --build-arg NODEDRAIN_GIT_COMMIT="$(git rev-parse --short HEAD)" .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/nodedrain:TAG --push .
#
# The builder is Alpine, whose native Rust target is musl: the binary is fully static on every
# architecture (Graviton spot nodes included), and aws-lc, the crypto under rustls, builds with
# Alpine's C compiler (aws-lc-sys knows the *-alpine-linux-musl targets). No OpenSSL anywhere.
FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev
# Shown by `nodedrain version`; compiled in.
ARG NODEDRAIN_GIT_COMMIT=unknown
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cargo.toml declares a [[bench]] target; cargo refuses a manifest whose declared targets are
# missing, even to build only the binary. (tests/ holds no declared target, so it stays out.)
COPY benches ./benches
# --target makes the musl target explicit, so the binary links statically (crt-static) while
# build scripts and proc-macros still build for the host.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
 && NODEDRAIN_GIT_COMMIT="$NODEDRAIN_GIT_COMMIT" cargo build --release --locked --target "$target" --bin nodedrain \
 && mkdir /out \
 && cp "target/$target/release/nodedrain" /out/nodedrain \
 && ln -s nodedrain /out/kubectl-nodedrain

# distroless static: CA certificates, /etc/passwd with the nonroot user (65532), no shell.
FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="nodedrain" \
      org.opencontainers.image.description="Kubernetes node drain assistant and spot interruption handler" \
      org.opencontainers.image.licenses="Apache-2.0"
# The directory, so the symlink stays a symlink: `kubectl-nodedrain` is the kubectl plugin name
# (kubectl nodedrain ...); distroless has no shell to make it here.
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/nodedrain"]
CMD ["controller"]
