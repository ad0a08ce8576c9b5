//! `etcd-proxy`: parse the command line, validate it, start, print the summary, serve.

use std::process::ExitCode;

use clap::Parser;
use etcd_proxy::{app, cli::Cli, config::Config, env, error::one_line, shutdown, telemetry};

/// mimalloc, because every request allocates (hyper, h2, header maps): the allocator's cost
/// is paid per request, and mimalloc serves these small, short-lived allocations from
/// thread-local pages more cheaply than glibc's malloc. Its `no_thp` build keeps transparent
/// huge pages off, so what an idle proxy and each idle connection hold is not rounded up to
/// huge pages.
///
/// Evidence (`cargo bench --bench compare`): a quarter less CPU per request than glibc's
/// malloc; with transparent huge pages on, idle RSS rose from 9 to 15 MiB and each idle HTTP/2
/// connection cost 35 KiB instead of 20.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log.as_deref());
    let print_env = cli.env;
    let config = match Config::try_from(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("etcd-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if print_env {
        return match env::exports(&config) {
            Ok(lines) => {
                println!("{lines}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("etcd-proxy: {e}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match runtime(config.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("etcd-proxy: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let running = app::start(config).await?;
        println!("{}", running.summary());
        running.serve(shutdown::signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd-proxy: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The async runtime: one event loop on the main thread for `threads == 1` (the default),
/// else a work-stealing pool of `threads` workers (0: one per core).
///
/// One loop is the cheapest way to serve a request: the tasks one request wakes (the client
/// connection, the upstream connection, the request itself) run back to back on one thread,
/// with no wake-ups or data handed across threads. A pool only pays off when one core cannot
/// keep up, as for an in-cluster gateway with many busy clients.
///
/// Evidence (`cargo bench --bench compare`): one loop used 20 % less CPU per request than two
/// workers.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}
