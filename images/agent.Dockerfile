# syntax=docker/dockerfile:1
# pgpilot-agent: an image that only carries the agent, and pgpilot-wal next to it (the small
# archive_command and restore_command). The operator runs it as the init container of every
# Postgres pod (`pgpilot-agent install /pgpilot/bin` copies both binaries into an emptyDir);
# the Postgres container then runs them from any upstream `postgres:<major>` image
# (Debian bookworm, glibc 2.36: the agent is built against that glibc, no newer).
#   buildah bud -f images/agent.Dockerfile -t ghcr.io/pgpilot/pgpilot-agent:0.1.0 .
# Bases by tag: the release job pins their digests (`crane digest`); no registry is reachable
# where the tests run, so `make images-check` validates the context instead (images/README.md).
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pgpilot-agent \
 && install -D -m 0755 target/release/pgpilot-agent /out/pgpilot-agent \
 && install -D -m 0755 target/release/pgpilot-wal /out/pgpilot-wal

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/pgpilot-agent /usr/local/bin/pgpilot-agent
# Next to the agent: `install` copies it along, and the agent renders it into archive_command.
COPY --from=build /out/pgpilot-wal /usr/local/bin/pgpilot-wal
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pgpilot-agent"]
CMD ["install", "/pgpilot/bin"]
