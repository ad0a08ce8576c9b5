//! `etcd-proxy`: parse the command line, validate it, start, print the summary, serve.

use std::process::ExitCode;

use clap::Parser;
use etcd_proxy::{app, cli::Cli, config::Config, env, error::one_line, shutdown, telemetry};

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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
