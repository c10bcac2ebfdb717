use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use corecast::auth::Claims;
use corecast::config::ConfigArgs;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "corecast",
    version,
    about = "A thread-per-core WebSocket engine for chat-style applications"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine.
    Serve(ConfigArgs),
    /// Print a signed token for a user (development and tests).
    Token {
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// PEM private key, for RS256 and ES256.
        #[arg(long)]
        private_key: Option<PathBuf>,
        /// Channels the token grants, as names or `*` patterns
        /// (comma-separated; `--channels ''` grants none).
        #[arg(long, value_delimiter = ',', default_value = "*")]
        channels: Vec<String>,
        /// Users the token may message or call directly (comma-separated
        /// names or patterns; without it, anyone).
        #[arg(long, value_delimiter = ',')]
        users: Option<Vec<String>>,
        /// Roles: `moderator`, `admin` (comma-separated).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Mint a subscription token for this one channel instead of a
        /// connection token.
        #[arg(long)]
        subscription: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Load the configuration, check it, and print the effective values.
    CheckConfig(ConfigArgs),
    /// Generate load against a corecast node (or, with --protocol raw, any
    /// broadcast WebSocket server) and report rates, latency, loss, server
    /// CPU per delivery and memory per connection.
    ///
    /// Progress goes to stderr every second, then a human summary; one JSON
    /// line per run goes to stdout. Pin the server and this tool to
    /// different cores (taskset) and give --server-pid for CPU and memory.
    Bench {
        #[command(subcommand)]
        workload: corecast::internals::bench::Workload,
        #[command(flatten)]
        common: corecast::internals::bench::Common,
    },
    /// Check whether this host can hold a number of connections.
    Doctor {
        /// The number of connections to plan for.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
    },
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CORECAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(args: ConfigArgs) -> ExitCode {
    // Before the shards allocate their tables.
    let small_pages = corecast::internals::node::small_pages();
    let config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("corecast: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(&config.log_format);
    if !small_pages {
        tracing::debug!("the kernel kept transparent huge pages for this process");
    }
    // The handlers go in before the port is bound: a SIGTERM that comes the
    // moment the node says it listens is a graceful stop, never the default
    // disposition's kill.
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]);
    let server = match corecast::server::start(config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if server.node.verifier.dev_mode {
        tracing::warn!("==============================================================");
        tracing::warn!("DEVELOPMENT MODE: no auth key configured. Tokens are signed with");
        tracing::warn!("a public, well-known secret; anyone can connect as any user.");
        tracing::warn!("Get one with: corecast token --user alice");
        tracing::warn!("Set auth.secret or auth.public_key_file before exposing this.");
        tracing::warn!("==============================================================");
    }
    let c = &server.node.config;
    tracing::info!(
        addr = %server.local_addr,
        shards = server.node.shards(),
        echo_endpoint = c.echo_endpoint,
        max_message_size = c.max_message_size,
        "corecast listening on {}",
        server.local_addr
    );
    match server.api_addr {
        Some(a) => tracing::info!(addr = %a, "server API listening on {a}"),
        None => tracing::info!("server API off (set api_keys to run it)"),
    }
    let node = server.node.clone();
    match signals {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                let mut forever = signals.forever();
                if let Some(sig) = forever.next() {
                    tracing::info!(signal = sig, "shutting down gracefully");
                    node.begin_drain();
                }
                if forever.next().is_some() {
                    tracing::warn!("second signal: exiting now");
                    std::process::exit(1);
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot install signal handlers"),
    }
    match server.wait() {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Bench { workload, common } => {
            match corecast::internals::bench::run(common, workload, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("corecast bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Doctor { connections } => {
            let findings = corecast::internals::doctor::evaluate(
                &corecast::internals::doctor::Readings::from_host(),
                connections,
            );
            let (text, failed) = corecast::internals::doctor::report(&findings, connections);
            print!("{text}");
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::CheckConfig(args) => match args.load() {
            Ok(c) => {
                let mut shown = c.clone();
                if let Some(lk) = shown.livekit.as_mut() {
                    lk.api_secret = "<hidden>".into();
                }
                if shown.auth.secret.is_some() {
                    shown.auth.secret = Some("<hidden>".into());
                }
                for k in shown.api_keys.iter_mut() {
                    *k = "<hidden>".into();
                }
                if !shown.webhook.secret.is_empty() {
                    shown.webhook.secret = "<hidden>".into();
                }
                if !shown.hooks.secret.is_empty() {
                    shown.hooks.secret = "<hidden>".into();
                }
                shown.redis = corecast::config::without_password(&shown.redis);
                for url in shown.redis_cluster.iter_mut() {
                    *url = corecast::config::without_password(url);
                }
                print!("{}", toml::to_string(&shown).expect("config serializes"));
                println!("\n# Effective rate limits per user (defaults, then rate_limits):");
                for (event, limit) in c.rate_limits().expect("validated").entries() {
                    let limit = limit.map_or("off".to_string(), |l| l.to_string());
                    println!("#   {event:<28} {limit}");
                }
                let dev = c.auth.secret.is_none() && c.auth.public_key_file.is_none();
                eprintln!(
                    "configuration OK{}",
                    if dev {
                        " (development mode: no auth key configured)"
                    } else {
                        ""
                    }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("corecast: {e}");
                ExitCode::from(2)
            }
        },
        Command::Token {
            user,
            ttl,
            private_key,
            channels,
            users,
            roles,
            subscription,
            config,
        } => {
            let cfg = match config.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("corecast: {e}");
                    return ExitCode::from(2);
                }
            };
            let pem = match private_key.map(std::fs::read).transpose() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("corecast: cannot read private key: {e}");
                    return ExitCode::from(2);
                }
            };
            let exp = (jsonwebtoken_now() as i64 + ttl).max(0) as u64;
            let claims = match subscription {
                Some(channel) => Claims::subscription(user, channel, exp),
                None => {
                    let mut c = Claims::new(user, exp)
                        .channels(channels.into_iter().filter(|c| !c.is_empty()))
                        .roles(roles);
                    c.users = users;
                    c
                }
            };
            match corecast::auth::mint_claims(&cfg.auth, &claims, pem.as_deref()) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("corecast: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn jsonwebtoken_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
