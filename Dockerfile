# syntax=docker/dockerfile:1
#
# portcullis container image.
#
#   docker build -t portcullis .
#   docker run --rm -p 127.0.0.1:6380:6380 -p 127.0.0.1:9190:9190 \
#     -e PORTCULLIS_BACKEND=redis:6379 -e PORTCULLIS_PROTECTED_MODE=false portcullis
#
# Protected mode stays ON in the image: with no [[users]] in a config file, portcullis
# answers -DENIED to non-loopback clients, and container clients are never loopback.
# Configure [[users]] (see config/*.toml) or, where the network alone restricts who can
# reach 6380, set PORTCULLIS_PROTECTED_MODE=false. See config/README.md.
#
# Runtime: gcr.io/distroless/cc-debian12 (glibc + libgcc, no shell, no package manager),
# running as the distroless "nonroot" user (65532). Base ~23 MB + the binary.
#
# Health check: distroless has no shell and no curl, and portcullis has no self-check
# subcommand. We copy ONE statically linked busybox binary (~1 MB, musl build) to
# /usr/local/bin/busybox and use its `wget` against /healthz, in exec form, so no shell is
# needed (no /bin/sh or applet symlinks are installed). The same exec form works in an ECS
# task definition ("healthCheck": {"command": ["CMD", "/usr/local/bin/busybox", "wget", ...]});
# "CMD-SHELL" would not, as there is no /bin/sh. Rejected alternatives: debian:bookworm-slim
# with bash /dev/tcp (no install needed, but ~75 MB before the binary); plain distroless
# with only load-balancer health checks (then ECS dependsOn/HEALTHY cannot be used).
# If you change PORTCULLIS_ADMIN_LISTEN's port, override the HEALTHCHECK too.

ARG RUST_IMAGE=rust:1-slim-bookworm
ARG BUSYBOX_IMAGE=busybox:1.36.1-musl
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUSYBOX_IMAGE} AS busybox

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# Only what the build reads (see .dockerignore). benches/ is needed because Cargo.toml
# declares a [[bench]] target, which cargo checks even when it does not build it.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# The cache mounts keep the registry and target dir between builds; the binary is copied
# out of the cached target dir in the same step. --strip-debug drops the line tables that
# [profile.release] debug = 1 adds (28 MB -> 4.6 MB) and keeps the symbol table, so a
# panic backtrace still names functions.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && mkdir -p /out \
 && strip --strip-debug -o /out/portcullis target/release/portcullis

FROM ${RUNTIME_IMAGE}
COPY --from=builder /out/portcullis /usr/local/bin/portcullis
COPY --from=busybox /bin/busybox /usr/local/bin/busybox
# distroless "nonroot" (numeric, so runAsNonRoot-style checks can verify it).
USER 65532:65532
# Inside a container the proxy must listen on all interfaces; who may reach it is decided
# by published ports / security groups. Backends come from PORTCULLIS_BACKEND or a config
# file (PORTCULLIS_CONFIG); a backend password can only be given in the config file.
ENV PORTCULLIS_LISTEN=0.0.0.0:6380 \
    PORTCULLIS_ADMIN_LISTEN=0.0.0.0:9190
# 6380: RESP data port. 9190: admin HTTP (/healthz /readyz /metrics /topology).
EXPOSE 6380 9190
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/busybox", "wget", "-q", "-T", "2", "-O", "/dev/null", "http://127.0.0.1:9190/healthz"]
# SIGTERM drains client connections (10 s grace) and exits 0; give the orchestrator's stop
# timeout more than that (ECS stopTimeout 30, docker stop -t 15).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/portcullis"]
