# syntax=docker/dockerfile:1
# Build stage: a release binary; the registry and target dir are BuildKit caches, so a
# source edit rebuilds only tollgate itself.
FROM rust:1.95-slim-bookworm AS build
# jemalloc (the binary's allocator) is built from C sources with configure and make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tollgate \
    && cp target/release/tollgate /tollgate \
    && strip /tollgate

# Runtime stage: Debian slim with CA certificates (for https upstreams) and a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tollgate \
    && mkdir -p /data /etc/tollgate \
    && chown tollgate /data
COPY --from=build /tollgate /usr/local/bin/tollgate
COPY config/docker.toml /etc/tollgate/tollgate.toml
USER tollgate
ENV TOLLGATE_CONFIG=/etc/tollgate/tollgate.toml
VOLUME ["/data"]
EXPOSE 4000
# Orchestrators should probe GET /health/live and /health/ready.
CMD ["tollgate", "serve", "--log-format", "json"]
