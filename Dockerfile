# syntax=docker/dockerfile:1
# Build stage: a profile-guided release binary (bench/pgo.sh: an instrumented build runs the
# benchmark's workload against the bundled mock upstream for a few seconds, then the release
# build is optimised with that profile; ~15% less CPU a request than a plain release build,
# see docs/benchmarks.md). The registry and target dir are BuildKit caches.
FROM rust:1.95-slim-bookworm AS build
# make: jemalloc (the binary's allocator) is built from C sources. llvm-22 (llvm-profdata of
# rustc 1.95's LLVM, from bookworm-security), wrk, curl and python3: the PGO training run.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make llvm-22 wrk curl python3 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    bash bench/pgo.sh --out /tollgate \
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
