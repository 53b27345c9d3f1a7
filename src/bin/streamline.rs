//! The `streamline` binary: parse the configuration, set up logging and
//! signals, run the gateway.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use streamline::Config;
use streamline::config::LogFormat;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: not in a journal,
        // a file or a log collector.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Every stream is a socket: take the whole hard limit on open files (the
/// soft limit is often 1,024), as a server of many connections should.
fn raise_open_files_limit(max_clients: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_clients as u64 => tracing::warn!(
            open_files = limit,
            max_clients,
            "the open-files limit is below --max-clients; raise it (ulimit -n, LimitNOFILE)"
        ),
        Ok(limit) => tracing::debug!(open_files = limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    init_tracing(config.log_format);
    raise_open_files_limit(config.max_clients);
    let shutdown = CancellationToken::new();
    if let Err(e) = streamline::lifecycle::spawn_signal_handler(shutdown.clone()) {
        tracing::error!(error = %e, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    match streamline::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            ExitCode::FAILURE
        }
    }
}

/// jemalloc rather than glibc's malloc: an idle stream's buffers are mostly
/// untouched, and jemalloc's size classes keep the untouched pages out of
/// memory (glibc's chunk headers and arenas touch them). Measured with
/// `streamline-bench --idle-only`: 10 KiB per idle stream instead of 14.
/// Without the `jemalloc` feature (default on), the system allocator.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
