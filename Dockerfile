# nodedrain: a static binary on a distroless base, running as non-root.
# Build: docker build -t nodedrain:dev .
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# rustls throughout (no OpenSSL), so the musl build is fully static.
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin nodedrain \
 && cp target/x86_64-unknown-linux-musl/release/nodedrain /nodedrain

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /nodedrain /usr/local/bin/nodedrain
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/nodedrain"]
CMD ["controller"]
