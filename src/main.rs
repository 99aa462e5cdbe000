//! The binary: parse flags, install logging and metrics, bind, run, map errors to exit
//! codes (2 = bad configuration, 1 = runtime failure). Nothing else lives here.

use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use portcullis::cli::Cli;
use portcullis::config::LogFormat;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.load() {
        Ok(c) => c,
        Err(e) => {
            report(&format!("portcullis: {e}"));
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        // Also load what the config points at (TLS certificates and keys).
        if let Err(e) = portcullis::runtime::Runtime::build(config.clone(), 0) {
            report(&format!("portcullis: {e}"));
            return ExitCode::from(2);
        }
        // A closed pipe (`| head`) is not an error worth a panic.
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{config:#?}");
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    // Colours only on a terminal: never escape codes in log files.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A log line that cannot be written (stderr closed: a pipe whose reader left) is
        // lost, nothing more. By default the subscriber reports it with `eprintln!`,
        // which panics on the same closed stderr: the task that logged died (the signal
        // task with it, and SIGTERM was then ignored for good).
        .log_internal_errors(false);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    // One CPU (a pinned process, a cgroup quota of one core or less, the usual sidecar):
    // a multi-threaded runtime would have one worker anyway, and pays for work stealing
    // it cannot use (atomics on every wake-up, a second thread to wake for timers).
    let cpus = std::thread::available_parallelism().ok();
    let one_cpu = cpus.is_some_and(|n| n.get() == 1);
    let mut builder = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    tracing::info!(
        cpus = cpus.map_or(0, |n| n.get()),
        threaded = !one_cpu,
        "starting the runtime"
    );
    // One thread: small writes of every connection go to the kernel together, when the
    // thread runs out of work (`portcullis::uring`).
    if one_cpu && config.runtime.io_uring == portcullis::config::IoUringMode::Auto {
        match portcullis::uring::enable(&mut builder) {
            Ok(()) => tracing::info!("batched sends through io_uring"),
            Err(e) => tracing::info!(error = %e, "io_uring unavailable; direct sends"),
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            report(&format!("portcullis: cannot start the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async_main(cli, config))
}

async fn async_main(cli: Cli, config: portcullis::Config) -> ExitCode {
    // Before the first listen: from the moment a client (or an orchestrator's health check)
    // can connect, SIGTERM drains and SIGHUP reloads instead of taking their default
    // action, which ends the process.
    let signals = match Signals::register() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install the signal handlers");
            return ExitCode::from(1);
        }
    };
    let Signals {
        mut term,
        mut interrupt,
        mut hangup,
    } = signals;
    let listener = match TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(listen = %config.listen, error = %e, "cannot bind the data listener");
            return ExitCode::from(1);
        }
    };
    let admin = if config.admin.listen.is_empty() {
        None
    } else {
        match TcpListener::bind(&config.admin.listen).await {
            Ok(l) => Some(l),
            Err(e) => {
                error!(admin = %config.admin.listen, error = %e, "cannot bind the admin listener");
                return ExitCode::from(1);
            }
        }
    };
    let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ])
        .and_then(|b| b.install_recorder())
    {
        Ok(h) => Some(h),
        Err(e) => {
            error!(error = %e, "cannot install the metrics recorder");
            None
        }
    };
    let shutdown = CancellationToken::new();
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        stop_signal(&mut term, &mut interrupt).await;
        info!("signal received: draining (a second signal exits at once)");
        signal_token.cancel();
        stop_signal(&mut term, &mut interrupt).await;
        std::process::exit(130);
    });
    // SIGHUP: re-read the file and flags; the proxy swaps in what is valid.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let cli = std::sync::Arc::new(cli);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            info!("SIGHUP: reloading the configuration");
            // A file read: off the runtime's threads (see the reload in `server::run`).
            let reader = cli.clone();
            let loaded = match tokio::task::spawn_blocking(move || reader.load()).await {
                Ok(loaded) => loaded,
                Err(e) => {
                    portcullis::metrics::config_reload(false);
                    error!(error = %e, "config reload failed; the running config stays");
                    continue;
                }
            };
            match loaded {
                Ok(config) => {
                    if reload_tx.send((config, None)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    portcullis::metrics::config_reload(false);
                    error!(error = %e, "config reload rejected; the running config stays");
                }
            }
        }
    });
    let control = portcullis::Control {
        shutdown,
        reloads: Some(reload_rx),
        metrics,
    };
    match portcullis::run(config, listener, admin, control).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "portcullis stopped");
            ExitCode::from(2)
        }
    }
}

/// A line on stderr before logging starts; lost, not a panic, when stderr is closed.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The signals the proxy acts on. Registering one replaces its default action (for all
/// three: end the process) at once, and a signal that arrives before its task first waits
/// is kept for that wait.
struct Signals {
    /// SIGTERM: drain, then exit; a second one exits at once.
    term: Signal,
    /// SIGINT (Ctrl-C): as SIGTERM.
    interrupt: Signal,
    /// SIGHUP: reload the configuration.
    hangup: Signal,
}

impl Signals {
    fn register() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// The next SIGTERM or SIGINT.
async fn stop_signal(term: &mut Signal, interrupt: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = interrupt.recv() => {}
    }
}
