# syntax=docker/dockerfile:1
# pgpilot-operator: built in Rust's Debian 12 image, run from distroless cc (glibc, no shell),
# as the non-root user 65532. Build from the repository root:
#   buildah bud -f images/operator.Dockerfile -t ghcr.io/pgpilot/pgpilot-operator:0.1.0 .
# Bases by tag: the release job pins their digests (`crane digest`); no registry is reachable
# where the tests run, so `make images-check` validates the context instead (images/README.md).
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pgpilot-operator \
 && install -D -m 0755 target/release/pgpilot-operator /out/pgpilot-operator

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/pgpilot-operator /usr/local/bin/pgpilot-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/pgpilot-operator"]
CMD ["run"]
