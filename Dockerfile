# syntax=docker/dockerfile:1
# Switchboard: a multi-stage build, from the repository root:
#   docker build -t switchboard:0.1.0 .
# The build step is the README's (`cargo build --release --locked`); the
# release profile carries no debug info: a 25 MB binary (138 MB with it).
# The runtime image is Debian slim with CA certificates (for Memorystore over
# TLS and Google Cloud Pub/Sub) and a non-root user.
#
# Base images are pinned by tag (Rust minor version, Debian release); append
# `@sha256:…` to pin a digest for byte-for-byte rebuilds. Packages are not
# pinned to versions: an exact Debian version leaves the archive at the next
# point release and breaks the build, and the security fixes come with
# rebuilding.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin switchboard \
 && cp target/release/switchboard /switchboard

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin switchboard
COPY --from=build /switchboard /usr/local/bin/switchboard
USER 10001
ENV PORT=8080 \
    SWITCHBOARD_LOG_FORMAT=json
EXPOSE 8080
# The binary probes its own /livez; no curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/switchboard", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/switchboard"]
