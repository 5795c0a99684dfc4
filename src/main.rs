//! The `overlayd` binary: see the library ([`overlayd`]) for the layout.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{info, warn};

use overlayd::api::{self, Failure};
use overlayd::cli::{
    self, Cli, Command, DaemonArgs, DataPathArgs, LogFormat, ObserveArgs, PluginArgs,
};
use overlayd::daemon::{self, Daemon, Start};
use overlayd::{state_dir, token};

/// sysexits.h EX_USAGE: the command was wrong, nothing was changed.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr);
    match cli.command.log_format() {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(if failure.usage { EX_USAGE } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let api = cli.api;
    match cli.command {
        Command::Init(args) => serve(config(api, args), Start::Init).await,
        Command::Join {
            peer,
            token,
            daemon: args,
        } => {
            let join = token::JoinSecret::from_token(&token).map_err(Failure::usage)?;
            let peer = cli::peer_addr(&peer, args.gossip_port).map_err(Failure::usage)?;
            serve(config(api, args), Start::Join { peer, join }).await
        }
        Command::Run {
            state_dir,
            data_path,
            plugins,
            observe,
        } => {
            let identity = state_dir::load_identity(&state_dir)?;
            let args = DaemonArgs {
                advertise_addr: identity.advertise,
                state_dir,
                vxlan_port: identity.vxlan_port,
                gossip_port: identity.gossip_port,
                data_path,
                plugins,
                observe,
            };
            serve(config(api, args), Start::Resume(identity)).await
        }
        command => {
            let (request, render) = command.request().expect("daemon verbs handled above");
            let reply = api::call(&api, &request).await?;
            println!("{}", render.show(reply?)?);
            Ok(())
        }
    }
}

async fn serve(config: daemon::Config, start: Start) -> Result<(), Failure> {
    let greeting = match start {
        Start::Init => "Cluster initialised.",
        Start::Join { .. } => "Joined the cluster.",
        Start::Resume(_) => "Node restarted; rejoining the cluster.",
    };
    let advertise = config.advertise;
    raise_open_file_limit();
    let daemon = Daemon::start(config, start).await?;
    println!("{greeting} To add a node, run on it:");
    println!(
        "    overlayd join {advertise} --token {} --advertise-addr ADDR",
        daemon.token()
    );
    // A stop, restartable or not, first drains this node's tasks from every balancer; a node
    // that left the cluster (`node leave`) goes for good.
    let how = tokio::select! {
        how = shutdown_signal() => {
            info!(?how, "shutting down");
            daemon.drain().await;
            how
        }
        () = daemon.departed() => daemon::Stop::Teardown,
    };
    daemon.stop(how).await;
    Ok(())
}

/// Raises the soft open-file limit to the hard one. Every peer connection, API client and TAP
/// costs a descriptor, and a soft limit of 1024 (a common default) is a few hundred connections
/// from refusing the API socket's `accept`.
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => info!(from = ?limit.current, to = ?limit.maximum, "open-file limit raised"),
        Err(err) => warn!(%err, soft = ?limit.current, "could not raise the open-file limit"),
    }
}

fn config(api: PathBuf, args: DaemonArgs) -> daemon::Config {
    let DataPathArgs {
        workers,
        no_offloads,
        conntrack_tcp_idle,
    } = args.data_path;
    let PluginArgs { docker_plugin } = args.plugins;
    let ObserveArgs { metrics, .. } = args.observe;
    daemon::Config {
        advertise: args.advertise_addr,
        gossip_port: args.gossip_port,
        vxlan_port: args.vxlan_port,
        state_dir: args.state_dir,
        api,
        workers: workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        offloads: !no_offloads,
        tcp_idle: conntrack_tcp_idle.map(std::time::Duration::from_secs),
        docker_plugin,
        metrics,
    }
}

/// Waits for SIGTERM (a supervisor stopping or restarting the node: it will run again) or
/// SIGINT (Ctrl-C: stopped for good).
async fn shutdown_signal() -> daemon::Stop {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => daemon::Stop::Restartable,
        _ = tokio::signal::ctrl_c() => daemon::Stop::Teardown,
    }
}
