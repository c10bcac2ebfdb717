# Multi-stage build: compile in the Rust image, run on a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY benches ./benches
RUN cargo build --release --locked --bin corecast

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 corecast \
 && mkdir -p /var/lib/corecast && chown corecast /var/lib/corecast
COPY --from=build /src/target/release/corecast /usr/local/bin/corecast
USER corecast
# Bans are kept here across restarts (ban_file): mount a volume to keep them
# across containers too.
WORKDIR /var/lib/corecast
VOLUME /var/lib/corecast
EXPOSE 8080
# Docker's default seccomp profile blocks io_uring: corecast then warns and
# runs on epoll. See the README ("Docker and io_uring").
ENTRYPOINT ["/usr/local/bin/corecast"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
