# syntax=docker/dockerfile:1
#
# dropbox-operator: one small, non-root image for every subcommand.
#
#   docker build -t dropbox-operator:0.1.0 .
#   docker run --rm dropbox-operator:0.1.0 crd
#   docker run --rm -i dropbox-operator:0.1.0 import - < instance.json
#   (the Helm chart runs it with args ["controller"], the controller runs the
#   webhook ingress with args ["ingress"])
#
# Base images, pinned by tag:
# - rust:1.95.0-bookworm: the toolchain the crate is built and tested with
#   (Cargo.toml's rust-version, 1.89, is only the floor), on Debian 12, whose
#   glibc (2.36) is the runtime image's: a binary linked here runs there.
# - gcr.io/distroless/cc-debian12:nonroot: glibc, libgcc_s (Rust's unwinder),
#   CA certificates (/etc/ssl/certs, for https to Dropbox and the API server),
#   tzdata and the nonroot user (65532); no shell, no package manager. TLS is
#   rustls with ring, so no OpenSSL is needed (static-debian12 lacks glibc).
#
# No container engine runs on the development machine: hack/verify-runtime-image.sh
# checks the runtime stage there (same build command, a root filesystem with only
# what this image provides that the binary needs, subcommands run as uid 65532).

FROM rust:1.95.0-bookworm AS build
WORKDIR /build

# Dependencies in their own layer, rebuilt only when Cargo.toml or Cargo.lock
# change: an empty library and main stand in for the crate. The build command is
# the one in hack/verify-runtime-image.sh (BUILD_COMMAND); keep them identical.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin dropbox-operator \
 && rm -rf src

# The crate itself. COPY keeps the files' modification times, which may be older
# than the dummy build's outputs: touch them so that cargo rebuilds.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin dropbox-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="dropbox-operator" \
      org.opencontainers.image.description="Kubernetes operator for Dropbox element instances: OAuth lifecycle and signed file-change events" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /build/target/release/dropbox-operator /dropbox-operator
# Numeric, so that the kubelet can enforce runAsNonRoot (it cannot resolve names).
USER 65532:65532
# The controller serves metrics and probes on 8080; the ingress serves webhooks
# on 8080 and its metrics and probes on 8081 (never behind its public Service).
EXPOSE 8080 8081
ENTRYPOINT ["/dropbox-operator"]
CMD ["--help"]
